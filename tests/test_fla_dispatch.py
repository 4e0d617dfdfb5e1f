"""The flash-linear-attention dispatch, on CPU: the fallback is taken, and the argument mapping is checked against a
stand-in `fla` that implements fla's documented conventions (time-first `(B, T, H, D)` tensors, natural-log gates
`g (B, T, H)` / `(B, T, H, K)` / `g_gamma (H,)`, `scale` applied to `q`, states `(B, H, K, V)`) on top of our
reference kernel. The real kernels are compared with ours on a GPU in `tests/test_cuda.py`."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from families import FAMILIES

from hf_extras.models import fla_dispatch
from hf_extras.models.retention_ops import chunkwise_retention

RETENTION_FAMILIES = [f for f in FAMILIES if f.name in ("retnet", "gla", "gated_retnet", "linear_attention")]


class FakeFla:
    """`fla.ops.simple_gla.chunk_simple_gla` and `fla.ops.gla.chunk_gla` with fla's conventions; records calls."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def _run(self, name, q, k, v, g, g_gamma, scale, initial_state, output_final_state, kwargs, cu_seqlens=None):
        assert "head_first" not in kwargs and q.shape == k.shape and q.shape[:3] == v.shape[:3]
        if cu_seqlens is not None:  # fla's varlen convention: batch 1, each sequence from its own initial state
            assert q.shape[0] == 1 and cu_seqlens.dtype == torch.long and int(cu_seqlens[-1]) == q.shape[1]
            self.calls.append((name + "/varlen", dict(sequences=cu_seqlens.tolist())))
            outs, finals = [], []
            for i, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
                piece = lambda x, a=a, b=b: None if x is None else x[:, a:b]  # noqa: E731
                s0 = initial_state[i : i + 1] if initial_state is not None else None
                o, state = self._run(name, piece(q), piece(k), piece(v), piece(g), g_gamma, scale, s0, True, kwargs)
                self.calls.pop()
                outs.append(o)
                finals.append(state)
            return torch.cat(outs, 1), torch.cat(finals) if output_final_state else None
        self.calls.append(
            (
                name,
                dict(
                    shape=tuple(q.shape),
                    g=None if g is None else tuple(g.shape),
                    g_gamma=g_gamma is not None,
                    scale=scale,
                ),
            )
        )
        log = g_gamma if g_gamma is not None else (g.transpose(1, 2) if g is not None else None)
        head_first = [x.transpose(1, 2) for x in (q * scale, k, v)]
        o, state = chunkwise_retention(
            *head_first, log, chunk_size=16, initial_state=initial_state, output_final_state=output_final_state
        )
        return o.transpose(1, 2).to(q.dtype), state

    def chunk_simple_gla(
        self,
        q,
        k,
        v,
        g=None,
        g_gamma=None,
        scale=None,
        initial_state=None,
        output_final_state=False,
        cu_seqlens=None,
        **kwargs,
    ):
        return self._run(
            "simple_gla", q, k, v, g, g_gamma, scale, initial_state, output_final_state, kwargs, cu_seqlens
        )

    def chunk_gla(
        self, q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs
    ):
        assert g.dim() == 4
        return self._run("gla", q, k, v, g, None, scale, initial_state, output_final_state, kwargs, cu_seqlens)


@pytest.fixture
def fake_fla(monkeypatch):
    fake = FakeFla()
    modules = {name: types.ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.gla", "fla.ops.simple_gla")}
    modules["fla.ops.gla"].chunk_gla = fake.chunk_gla
    modules["fla.ops.simple_gla"].chunk_simple_gla = fake.chunk_simple_gla
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(fla_dispatch, "DISPATCH_DEVICE_TYPES", ("cpu",))  # let the stand-in run on CPU tensors
    monkeypatch.setattr(fla_dispatch, "_KERNELS", {})
    monkeypatch.delenv("HF_EXTRAS_FLA", raising=False)
    return fake


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("family", RETENTION_FAMILIES, ids=lambda f: f.name)
def test_fake_fla_gets_the_mapped_arguments(family, fake_fla, monkeypatch):
    model = family.cls("ForCausalLM")(family.config(num_heads=2)).eval()
    ids = torch.randint(3, 96, (2, 40))
    dispatched = _logits(model, ids)
    expected_kernel = "gla" if family.tiny.get("gate") == "key" else "simple_gla"
    assert [name for name, _ in fake_fla.calls] == [expected_kernel] * 2  # one call per layer
    call = fake_fla.calls[0][1]
    assert call["shape"] == (2, 40, 2, 16) and call["scale"] == 1.0  # time-first; q already scaled by the caller
    if family.name == "retnet":
        assert call["g_gamma"] and call["g"] is None
    elif family.name == "gated_retnet":
        assert call["g"] == (2, 40, 2)
    monkeypatch.setenv("HF_EXTRAS_FLA", "0")  # the switch: the PyTorch forms, no call
    fake_fla.calls.clear()
    torch.testing.assert_close(dispatched, _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert fake_fla.calls == []


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("retnet", "gla", "gated_retnet", "mamba2")])
def test_packed_rows_go_through_fla_varlen(family, fake_fla, monkeypatch):
    """Packed rows (two rows, documents restarting at 0) reach fla as one varlen sequence per document; outputs and
    the rows' final states (through a continued decoding step) equal the PyTorch forms'."""
    torch.manual_seed(0)
    model = family.cls("ForCausalLM")(family.config(initializer_range=0.2)).eval()
    ids = torch.randint(3, 96, (2, 20))
    positions = torch.stack([torch.cat([torch.arange(7), torch.arange(13)]), torch.cat([torch.arange(20)])])
    with torch.no_grad():
        out = model(ids, position_ids=positions, use_cache=True)
        step = model(ids[:, :1], cache=out.cache, position_ids=torch.full((2, 1), 20)).logits
    names = {name for name, _ in fake_fla.calls}
    assert names and all(name.endswith("/varlen") for name in names)
    assert fake_fla.calls[0][1]["sequences"] == [0, 7, 20, 40]
    monkeypatch.setenv("HF_EXTRAS_FLA", "0")
    with torch.no_grad():
        ref = model(ids, position_ids=positions, use_cache=True)
        ref_step = model(ids[:, :1], cache=ref.cache, position_ids=torch.full((2, 1), 20)).logits
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)


def test_fake_fla_prefill_state_seeds_decoding(fake_fla):
    """Prefill through the dispatch hands its final state to the recurrent decoding steps (never dispatched)."""
    family = next(f for f in RETENTION_FAMILIES if f.name == "gla")
    model = family.cls("ForCausalLM")(family.config()).eval()
    ids = torch.randint(3, 96, (1, 30))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    assert fake_fla.calls  # the prefill went to the stand-in


def test_bidirectional_and_decoding_steps_are_not_dispatched(fake_fla):
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    for kwargs in (dict(mode="chunkwise", bidirectional=True), dict(mode="recurrent")):
        assert fla_dispatch.fla_decayed_linear_attention(q, k, v, None, **kwargs) is None
    assert fake_fla.calls == []


def test_cpu_tensors_and_missing_fla_fall_back(monkeypatch):
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    assert fla_dispatch.fla_decayed_linear_attention(q, k, v, None, mode="chunkwise") is None  # CPU: never
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")] or ["fla"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import fla` (and its submodules) raises ImportError
    monkeypatch.setattr(fla_dispatch, "DISPATCH_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_dispatch, "_KERNELS", {})
    assert fla_dispatch.fla_decayed_linear_attention(q, k, v, None, mode="chunkwise") is None
