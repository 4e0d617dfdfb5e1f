"""Packed (padding-free) batches through whole models: every family, form and head keeps documents apart.

A row holding several documents, marked as transformers' `DataCollatorWithFlattening` marks them (position ids that
restart at 0, or `seq_idx` / `cu_seq_lens_q`), must give each document the outputs and the gradients it gets alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, head_config
from transformers import DataCollatorWithFlattening

LENGTHS = (5, 1, 9, 3)  # one single-token document, lengths across the tiny chunk size (8)
FORMS = ("parallel", "chunkwise", "recurrent", "auto")


def _documents(vocab: int = 96, lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def _packed(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return ids, positions


def _model(family, head: str, forward_mode: str = "auto", **overrides):
    """A tiny model whose token mixing is strong (at the default 0.02 initialisation a leak between documents can
    stay under the tolerance)."""
    torch.manual_seed(0)
    overrides.setdefault("initializer_range", 0.2)
    config = head_config(family, head, forward_mode=forward_mode, **overrides)
    return family.cls(head)(config).eval()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32, 1e-5 relative to the tensor's scale (logits of these models reach ~5)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


def _split(out: torch.Tensor, docs) -> list[torch.Tensor]:
    return list(out[0].split([len(d) for d in docs], dim=0))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_packed_row_gives_each_document_its_logits_and_gradients(family, form):
    model = _model(family, "ForCausalLM", form)
    docs = _documents()
    ids, positions = _packed(docs)
    packed = model(ids, position_ids=positions).logits
    alone = [model(d[None]).logits[0] for d in docs]
    for got, want in zip(_split(packed, docs), alone):
        _close(got, want)

    # gradients: the packed row's summed per-document losses vs the documents one by one
    def doc_loss(logits, doc):
        return F.cross_entropy(logits[:-1], doc[1:], reduction="sum") if len(doc) > 1 else logits.sum() * 0

    # families exact in float64 (`Family.float64_exact`) compare in float64, where a leak shows above rounding however
    # sharp the tiny model's softmax is (the window family's local softmax at this initialisation moves a float32
    # gradient entry by ~1e-3 relative); the others in float32, to its rounding
    exact = family.float64_exact
    model.to(torch.float64 if exact else torch.float32).train()
    model.zero_grad()
    logits = model(ids, position_ids=positions).logits
    sum(doc_loss(lg, d) for lg, d in zip(_split(logits, docs), docs)).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(doc_loss(model(d[None]).logits[0], d) for d in docs).backward()
    for name, param in model.named_parameters():
        if param.grad is None:
            assert name not in packed_grads
            continue
        scale = float(param.grad.abs().max())  # rounding of sums over ~20 tokens: relative to the largest entry
        rtol, atol = (1e-9, 1e-10 * scale) if exact else (1e-4, 1e-5 * scale)
        torch.testing.assert_close(
            packed_grads[name], param.grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_bidirectional_rows_see_no_other_document(family):
    model = _model(family, "ForMaskedLM")
    docs = _documents(lengths=(4, 6, 2))
    ids, positions = _packed(docs)
    packed = model(ids, position_ids=positions).logits
    for got, doc in zip(_split(packed, docs), docs):
        _close(got, model(doc[None]).logits[0])


@pytest.mark.parametrize("head", ["Model", "ForTokenClassification"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_collator_marker_and_several_packed_rows(family, head):
    """`seq_idx` and `cu_seq_lens_q` from the collator, and a batch of two packed rows (with right padding)."""
    model = _model(family, head)
    docs = _documents(lengths=(3, 5, 4))
    features = [{"input_ids": d.tolist()} for d in docs]
    batch = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)(features)

    def out(**kw):
        result = model(**kw)
        return result.last_hidden_state if head == "Model" else result.logits

    alone = [out(input_ids=d[None])[0] for d in docs]
    want = torch.cat(alone)
    for marker in ({"position_ids": batch["position_ids"]}, {"seq_idx": batch["seq_idx"]}):
        _close(out(input_ids=batch["input_ids"], **marker)[0], want)
    got = out(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"])
    _close(got[0], want)

    # two rows: [d0 d1] and [d2 pad pad ...]; the pads do not touch d2
    row0 = torch.cat([docs[0], docs[1]])
    row1 = torch.cat([docs[2], torch.zeros(len(row0) - len(docs[2]), dtype=torch.long)])
    positions = torch.stack(
        [torch.cat([torch.arange(3), torch.arange(5)]), torch.cat([torch.arange(4), torch.arange(4, 8)])]
    )
    mask = torch.stack([torch.ones(8, dtype=torch.long), (torch.arange(8) < 4).long()])
    two = out(input_ids=torch.stack([row0, row1]), position_ids=positions, attention_mask=mask)
    _close(two[0], torch.cat(alone[:2]))
    _close(two[1, :4], alone[2])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("retnet", "gla", "mamba", "dyt")])
def test_left_padded_generate_positions_are_no_boundary(family):
    """generate() writes position ids that restart after left pads; that is padding, not a second document."""
    from hf_extras.models.packing import packed_document_starts

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    assert packed_document_starts(2, 5, mask, positions) is None
    model = _model(family, "ForCausalLM")
    ids = torch.randint(1, 96, (2, 5))
    a = model(ids, attention_mask=mask, position_ids=positions).logits
    b = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[:, 2:], b[:, 2:])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_packed_prefill_then_generate_continues_the_last_document(family):
    """generate() on a packed prompt: the continuation is that of the last document alone."""
    model = _model(family, "ForCausalLM")
    docs = _documents(lengths=(6, 4))
    ids, positions = _packed(docs)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    packed = model.generate(ids, attention_mask=torch.ones_like(ids), position_ids=positions, **kwargs)
    alone = model.generate(docs[1][None], attention_mask=torch.ones(1, 4, dtype=torch.long), **kwargs)
    assert packed.sequences[0, ids.shape[1] :].tolist() == alone.sequences[0, 4:].tolist()
    _close(torch.stack(packed.scores), torch.stack(alone.scores))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_packed_seq2seq_keeps_pairs_apart(family):
    torch.manual_seed(0)
    model = family.cls("ForConditionalGeneration")(family.config(initializer_range=0.2)).eval()
    sources, targets = _documents(lengths=(4, 7)), _documents(lengths=(3, 5), seed=1)
    src, src_pos = _packed(sources)
    tgt, tgt_pos = _packed(targets)
    packed = model(input_ids=src, position_ids=src_pos, decoder_input_ids=tgt, decoder_position_ids=tgt_pos).logits
    for got, s, t in zip(_split(packed, targets), sources, targets):
        want = model(input_ids=s[None], decoder_input_ids=t[None]).logits[0]
        _close(got, want)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_16k_packed_tokens_in_bf16_stay_finite(family):
    model = _model(family, "ForCausalLM").to(torch.bfloat16)
    docs = _documents(lengths=(5000, 3, 7000, 4381))
    ids, positions = _packed(docs)
    with torch.no_grad():
        logits = model(ids, position_ids=positions).logits
    assert torch.isfinite(logits.float()).all()
