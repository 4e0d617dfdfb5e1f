"""Document boundaries of padding-free batches (`hf_extras.models.packing`), from transformers' own collator."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from hf_extras.models.packing import (
    boundaries_from_kwargs,
    document_starts,
    document_starts_from_cu_seqlens,
    document_starts_from_seq_idx,
    log_decay_with_boundaries,
    log_decay_with_padding,
)
from hf_extras.models.retention_ops import decayed_linear_attention
from hf_extras.models.scan_ops import selective_scan

LENGTHS = (4, 1, 1, 7, 3)


def _collated(**kwargs):
    features = [{"input_ids": list(range(10, 10 + n))} for n in LENGTHS]
    return DataCollatorWithFlattening(return_tensors="pt", **kwargs)(features)


def _expected():
    starts = torch.zeros(1, sum(LENGTHS), dtype=torch.bool)
    starts[0, [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]] = True
    return starts


def test_every_collator_marker_gives_the_same_boundaries():
    batch = _collated(return_seq_idx=True, return_flash_attn_kwargs=True)
    T = batch["input_ids"].shape[1]
    expected = _expected()
    assert torch.equal(document_starts(batch["position_ids"]), expected)
    assert torch.equal(document_starts_from_seq_idx(batch["seq_idx"]), expected)
    assert torch.equal(document_starts_from_cu_seqlens(batch["cu_seq_lens_q"], T), expected)
    for key in ("position_ids", "seq_idx", "cu_seq_lens_q"):
        assert torch.equal(boundaries_from_kwargs(1, T, **{key: batch[key]}), expected), key
    assert boundaries_from_kwargs(1, T) is None


def test_position_ids_start_and_continued_rows():
    batch = _collated(position_ids_start=2)
    assert torch.equal(document_starts(batch["position_ids"], position_ids_start=2), _expected())
    # a row continuing from a cache (positions 5, 6, ...) keeps its state: no boundary at token 0;
    # right pads at position 1 (as generate() numbers them) are no boundary either
    position_ids = torch.tensor([[5, 6, 7, 0, 1, 2], [0, 1, 2, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(document_starts(position_ids), expected)


def test_cu_seqlens_edge_cases():
    # empty documents (repeated offsets) and the end offset are ignored
    starts = document_starts_from_cu_seqlens(torch.tensor([0, 3, 3, 5, 8, 8], dtype=torch.int32), 8)
    assert starts.tolist() == [[True, False, False, True, False, True, False, False]]


def test_bad_markers_are_named():
    with pytest.raises(ValueError, match="position_ids"):
        document_starts(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_idx"):
        document_starts_from_seq_idx(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        document_starts_from_cu_seqlens(torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="batch 1"):
        boundaries_from_kwargs(2, 5, cu_seq_lens_q=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\(batch, T\)"):
        boundaries_from_kwargs(1, 9, position_ids=torch.arange(5).unsqueeze(0))


def test_helpers_trace_as_one_graph():
    """No host syncs (.item(), .tolist(), data-dependent shapes): each helper compiles with fullgraph=True."""
    batch = _collated(return_seq_idx=True, return_flash_attn_kwargs=True)
    T = batch["input_ids"].shape[1]
    torch._dynamo.reset()
    for fn, arg in (
        (lambda p: document_starts(p), batch["position_ids"]),
        (lambda s: document_starts_from_seq_idx(s), batch["seq_idx"]),
        (lambda c: document_starts_from_cu_seqlens(c, T), batch["cu_seq_lens_q"]),
    ):
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        assert torch.equal(compiled(arg), _expected())
    torch._dynamo.reset()


def test_log_decay_helpers():
    reset = _expected()
    T = reset.shape[1]
    H = 2
    fixed = torch.tensor([-0.1, -0.2])
    ld = log_decay_with_boundaries(fixed, reset)
    assert ld.shape == (1, H, T) and torch.isneginf(ld[0, :, reset[0]]).all()
    assert torch.equal(ld[0, :, ~reset[0]], fixed[:, None].expand(H, int((~reset).sum())))
    assert log_decay_with_boundaries(None, reset, num_heads=H).shape == (1, H, T)
    per_key = torch.full((1, H, T, 3), -0.5)
    assert torch.isneginf(log_decay_with_boundaries(per_key, reset)[0, :, reset[0]]).all()
    mask = torch.ones(1, T, dtype=torch.long)
    mask[0, -2:] = 0
    padded = log_decay_with_padding(fixed, mask)
    assert padded.shape == (1, H, T) and (padded[0, :, -2:] == 0).all() and (padded[0, :, :-2] < 0).all()
    assert (log_decay_with_padding(per_key, mask)[0, :, -2:] == 0).all()


@pytest.mark.parametrize("kind", ["fixed", "head"])
def test_collated_row_through_the_kernels_equals_documents_alone(kind):
    """End to end: the collator's position_ids -> boundaries -> retention (as `reset` and as -inf log decays) and
    the selective scan give each document its outputs alone."""
    batch = _collated()
    reset = document_starts(batch["position_ids"])
    T, H, Dk = reset.shape[1], 2, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, Dk, generator=gen, dtype=torch.float64) for _ in range(3))
    ld = torch.tensor([-0.1, -0.3], dtype=torch.float64) if kind == "fixed" else -torch.rand(1, H, T, generator=gen)
    ld = ld.double()
    x, dt = torch.randn(1, T, 3, generator=gen, dtype=torch.float64), torch.rand(1, T, 3, generator=gen).double()
    A, B, C = -torch.rand(3, 2).double(), torch.randn(1, T, 2).double(), torch.randn(1, T, 2).double()
    o_reset, _ = decayed_linear_attention(q, k, v, ld, reset=reset)
    o_inf, _ = decayed_linear_attention(q, k, v, log_decay_with_boundaries(ld, reset))
    y, _ = selective_scan(x, dt, A, B, C, reset=reset)
    a = 0
    for n in LENGTHS:
        s = slice(a, a + n)
        o_alone, _ = decayed_linear_attention(q[:, :, s], k[:, :, s], v[:, :, s], ld if ld.dim() == 1 else ld[:, :, s])
        torch.testing.assert_close(o_reset[:, :, s], o_alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(o_inf[:, :, s], o_alone, rtol=1e-12, atol=1e-12)
        y_alone, _ = selective_scan(x[:, s], dt[:, s], A, B[:, s], C[:, s])
        torch.testing.assert_close(y[:, s], y_alone, rtol=1e-12, atol=1e-12)
        a += n
