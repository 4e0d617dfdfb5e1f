"""The softmax window inside the retention mixer (`attention_window`): both forms against a token-by-token
reference, the cache tail, gradients, long inputs, the mixer's combination, and linearizing with it.

Every generic check (heads, save/load, remote code, generation, padding, packing, LoRA, compile) runs on the
`gated_retnet_window` family of `tests/families.py`."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_extras import GatedDeltaNetConfig, GatedRetentionConfig, GatedRetentionForCausalLM, RetNetConfig
from hf_extras.convert import linearize
from hf_extras.models.window_attention import local_softmax_attention

B, H, T, D = 3, 2, 37, 8


def reference(q, k, v, window, bidirectional=False, mask=None, starts=None):
    """Token by token in float64: each real query over the real tokens of its document at most `window - 1` real
    tokens away (before it, or on either side), as the rows without their pads."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        real = [t for t in range(q.shape[2]) if mask is None or mask[b, t]]
        doc = torch.cumsum(starts[b].long(), 0) if starts is not None else torch.zeros(q.shape[2], dtype=torch.long)
        for i, t in enumerate(real):
            near = [s for j, s in enumerate(real) if (abs(i - j) if bidirectional else i - j) in range(window)]
            keys = [s for s in near if doc[s] == doc[t]]
            scores = torch.einsum("hd,hkd->hk", q[b, :, t].double(), k[b, :, keys].double())
            out[b, :, t] = torch.einsum("hk,hkd->hd", scores.softmax(-1), v[b, :, keys].double())
    return out


def inputs(seed=0, dtype=torch.float32, length=T):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, generator=g, dtype=dtype) for _ in range(3)]


def padding_and_documents(length=T):
    """Left, interior and right pads; documents starting mid-row (row 2 has three)."""
    mask = torch.ones(B, length, dtype=torch.long)
    mask[0, :5], mask[1, 20:24], mask[2, -3:] = 0, 0, 0
    starts = torch.zeros(B, length, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, 15], starts[2, 9], starts[2, 30] = True, True, True
    return mask, starts


@pytest.mark.parametrize("mode", ["dense", "blocked"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("window", [2, 5, 8, 64])
@pytest.mark.parametrize("masks", ["none", "padding", "documents", "both"])
def test_forms_match_the_token_by_token_reference(mode, bidirectional, window, masks):
    q, k, v = inputs()
    mask, starts = padding_and_documents()
    mask = mask if masks in ("padding", "both") else None
    starts = starts if masks in ("documents", "both") else None
    got, _ = local_softmax_attention(
        q, k, v, window, bidirectional=bidirectional, padding_mask=mask, document_starts=starts, mode=mode
    )
    want = reference(q, k, v, window, bidirectional, mask, starts)
    if mask is not None:
        want = want * mask[:, None, :, None]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_forms_agree_in_float64_with_gradients(bidirectional):
    mask, starts = padding_and_documents()
    grads = {}
    outs = {}
    for mode in ("dense", "blocked"):
        q, k, v = (x.double().requires_grad_() for x in inputs(seed=1))
        out, _ = local_softmax_attention(
            q, k, v, 6, bidirectional=bidirectional, padding_mask=mask, document_starts=starts, mode=mode
        )
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        outs[mode], grads[mode] = out, [x.grad for x in (q, k, v)]
    torch.testing.assert_close(outs["blocked"], outs["dense"], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads["blocked"], grads["dense"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [3, 6])
@pytest.mark.parametrize("masks", ["none", "padding", "documents", "both"])
def test_chunks_with_the_tail_equal_one_pass(window, masks):
    """Prefill and decode in pieces of 1 to 8 tokens through the tail give the one-pass outputs, with pads and
    document starts inside pieces, at their first token and as single-token steps."""
    q, k, v = inputs(seed=2)
    mask, starts = padding_and_documents()
    mask = mask if masks in ("padding", "both") else None
    starts = starts if masks in ("documents", "both") else None
    whole, _ = local_softmax_attention(q, k, v, window, padding_mask=mask, document_starts=starts)
    tail, pieces = None, []
    pieces_at = [(0, 1), (1, 9), (9, 10), (10, 12), (12, 13), (13, 14), (14, 15), (15, 20), (20, 21), (21, 22)]
    for a, b in pieces_at + [(22, 30), (30, 31), (31, 37)]:  # single tokens at pads and document starts too
        out, tail = local_softmax_attention(
            q[:, :, a:b],
            k[:, :, a:b],
            v[:, :, a:b],
            window,
            padding_mask=None if mask is None else mask[:, a:b],
            document_starts=None if starts is None else starts[:, a:b],
            tail=tail,
            keep_tail=True,
        )
        assert tail[0].shape == (B, H, window - 1, D) and tail[2].shape == (B, window - 1)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=1e-5, atol=1e-5)


def test_long_input_stays_finite_in_bf16_and_close_to_float32():
    q, k, v = inputs(seed=3, length=16384)
    q, k = q * 4, k * 4  # sharp scores
    want, _ = local_softmax_attention(q, k, v, 64)
    got, _ = local_softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 64)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().mean() < 0.05


def test_bad_calls_raise_clearly():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="window"):
        local_softmax_attention(q, k, v, 1)
    with pytest.raises(ValueError, match="no cache"):
        local_softmax_attention(q, k, v, 4, bidirectional=True, keep_tail=True)
    with pytest.raises(ValueError, match="mode"):
        local_softmax_attention(q, k, v, 4, mode="flash")


@pytest.mark.parametrize("config_class", [GatedRetentionConfig, RetNetConfig, GatedDeltaNetConfig])
@pytest.mark.parametrize("value", [0, 1, -3, 2.5, True])
def test_config_refuses_a_window_below_two(config_class, value):
    with pytest.raises(Exception, match="attention_window"):
        config_class(hidden_size=32, num_heads=2, attention_window=value)


def test_mixer_output_is_normed_linear_plus_window():
    """`o_proj(g_norm(linear) + window)`: with the norm's weight at 0 the block reads the window alone."""
    torch.manual_seed(0)
    config = GatedRetentionConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, gate="head", use_output_gate=False
    )
    plain = GatedRetentionForCausalLM(config).eval()
    windowed = GatedRetentionForCausalLM(GatedRetentionConfig(**{**config.to_dict(), "attention_window": 5})).eval()
    windowed.load_state_dict(plain.state_dict())
    mixer = windowed.model.layers[0].mixer
    x = torch.randn(2, 13, 32)
    q = mixer.q_proj(x).view(2, 13, 2, 16).transpose(1, 2)
    k = mixer.k_proj(x).view(2, 13, 2, 16).transpose(1, 2) * 16**-0.5
    v = mixer.v_proj(x).view(2, 13, 2, 16).transpose(1, 2)
    window, _ = local_softmax_attention(q, k, v, 5)
    window = window.transpose(1, 2).reshape(2, 13, 32)
    with torch.no_grad():
        linear_only = plain.model.layers[0].mixer(x)
        torch.testing.assert_close(mixer(x), linear_only + mixer.o_proj(window), rtol=1e-5, atol=1e-5)
        mixer.g_norm.weight.zero_()
        torch.testing.assert_close(mixer(x), mixer.o_proj(window), rtol=1e-5, atol=1e-6)


def linear_off(model):
    """Zero every linear mixer's output-norm weights, so the blocks read their softmax window alone."""
    for layer in model.model.layers:
        norm = getattr(layer.mixer, "g_norm", None) or layer.mixer.o_norm
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))  # linearize starts them at 1
        norm.weight.zero_()
    return model


@pytest.mark.parametrize("into", ["hfx_gated_retention", "hfx_retnet", "hfx_gated_deltanet"])
def test_linearized_copy_with_a_window_covering_the_input_is_the_teacher(into):
    """The window reads the teacher's own rotary q/k: with the linear part's norm weights at 0, a window as long as
    the text reproduces the teacher exactly, a shorter one the teacher's attention cut to the window."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
        )
    ).eval()
    ids = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        want = teacher(ids).logits
        exact = linearize(teacher, into=into, attention_window=20).eval()
        assert (exact(ids).logits - want).abs().max() > 1e-2  # the linear part starts on (norm weights 1)
        linear_off(exact)
        torch.testing.assert_close(exact(ids).logits, want, rtol=1e-5, atol=1e-5)
        cut = linear_off(linearize(teacher, into=into, attention_window=8).eval())
        torch.testing.assert_close(cut(ids).logits[:, :8], want[:, :8], rtol=1e-5, atol=1e-5)
        assert (cut(ids).logits[:, 8:] - want[:, 8:]).abs().max() > 1e-3
