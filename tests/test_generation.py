"""Generation with the fixed-size recurrent cache: same tokens as without cache, padding invariance, fixed memory."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES

from hf_extras import RecurrentCache

RECURRENT = [f for f in FAMILIES if f.recurrent]


def lm(family, **overrides):
    return family.cls("ForCausalLM")(family.config(**overrides)).eval()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_cache_equals_no_cache(family, mode):
    model = lm(family)
    ids = torch.randint(7, 96, (2, 19))  # longer than two chunks: the prefill runs the chunkwise form
    kwargs = {
        "greedy": dict(do_sample=False),
        "beam": dict(do_sample=False, num_beams=3),
        "sample": dict(do_sample=True, top_k=8),
    }[mode]
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        outs.append(model.generate(ids, max_new_tokens=10, use_cache=use_cache, pad_token_id=0, **kwargs))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_cached_logits_match_full_forward(family):
    """Prefill + one-token steps give the logits of a full forward pass (not just the same argmax)."""
    model = lm(family)
    ids = torch.randint(7, 96, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :17], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(17, 30):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_left_padding_changes_nothing(family):
    model = lm(family)
    short, long = torch.randint(7, 96, (1, 11)), torch.randint(7, 96, (1, 20))
    batch = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :9] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone_short = model.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone_long = model.generate(long, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0, 9:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])
    with torch.no_grad():  # and the prompt logits of the real tokens agree closely
        padded_logits = model(batch, attention_mask=mask).logits[0, 9:]
        alone_logits = model(short).logits[0]
    torch.testing.assert_close(padded_logits, alone_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", RECURRENT, ids=lambda f: f.name)
def test_decoding_uses_one_token_steps_and_fixed_state(family):
    """After the prefill every forward sees one token, and the cache holds the same bytes at any context length."""
    model = lm(family)
    seen_lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: seen_lengths.append(
            (kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]
        ),
        with_kwargs=True,
    )
    ids = torch.randint(7, 96, (1, 25))
    model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    hook.remove()
    assert seen_lengths == [25] + [1] * 5

    def state_bytes(context):
        with torch.no_grad():
            out = model(torch.randint(7, 96, (1, context)), use_cache=True)
        cache = out.cache
        assert isinstance(cache, RecurrentCache) and cache.get_seq_length() == context
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for states in (layer.recurrent_states, layer.conv_states)
            for t in states.values()
            if t is not None
        )

    assert state_bytes(8) == state_bytes(300) > 0


@pytest.mark.parametrize("family", RECURRENT, ids=lambda f: f.name)
def test_user_supplied_cache_and_wrong_cache_type(family):
    from transformers import DynamicCache

    model = lm(family)
    ids = torch.randint(7, 96, (1, 9))
    cache = RecurrentCache(config=model.config)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache, pad_token_id=0)
    assert out.shape == (1, 13) and cache.get_seq_length() == 12
    with pytest.raises(TypeError, match="RecurrentCache"):
        model(ids, cache=DynamicCache(), use_cache=True)
