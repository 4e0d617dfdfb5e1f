"""Tests for hf_extras.models.retention_ops (decayed linear attention kernels)."""

import pytest
import torch
import torch.nn.functional as F

from hf_extras.models.retention_ops import (
    chunkwise_retention,
    decayed_linear_attention,
    parallel_retention,
    pick_mode,
    recurrent_retention,
)

KINDS = ["none", "fixed", "head", "key"]
MODES = ["parallel", "chunkwise", "recurrent"]


def make_inputs(kind, dtype=torch.float32, B=2, H=3, T=100, Dk=16, Dv=8, seed=0, gate_bias=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) * Dk**-0.5
    k = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) * Dk**-0.5
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    if kind == "none":
        ld = None
    elif kind == "fixed":  # RetNet: gamma_h = 1 - 2^(-5-h)
        ld = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))
    elif kind == "head":
        ld = F.logsigmoid(torch.randn(B, H, T, generator=g, dtype=torch.float64) + gate_bias)
    else:
        ld = F.logsigmoid(torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) + gate_bias)
    s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(ld), cast(s0)


def brute_force(q, k, v, ld, s0=None, bidirectional=False):
    """Explicit sum over token pairs in float64 with the decay products written out:
    causal s <= t: prod_{r=s+1}^{t} a_r; anti-causal s > t: prod_{r=t}^{s-1} a_r."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, Dk = q.shape
    if ld is None:
        g = torch.zeros(B, H, T, Dk, dtype=torch.float64)
    elif ld.dim() == 1:
        g = ld.double().view(1, H, 1, 1).expand(B, H, T, Dk)
    elif ld.dim() == 3:
        g = ld.double().unsqueeze(-1).expand(B, H, T, Dk)
    else:
        g = ld.double()
    L = torch.cumsum(g, dim=2)  # (B, H, T, Dk)
    t = torch.arange(T)
    causal = (t[:, None] >= t[None, :]).view(1, 1, T, T, 1)
    logw = L.unsqueeze(3) - L.unsqueeze(2)  # [t, s] = sum_{r=s+1}^{t} g_r (for s <= t)
    W = torch.where(causal, logw, torch.tensor(float("-inf"), dtype=torch.float64)).exp()
    if bidirectional:
        Lx = L - g  # exclusive cumsum
        logw_b = Lx.unsqueeze(2) - Lx.unsqueeze(3)  # [t, s] = sum_{r=t}^{s-1} g_r (s > t)
        anti = (t[:, None] < t[None, :]).view(1, 1, T, T, 1)
        W = W + torch.where(anti, logw_b, torch.tensor(float("-inf"), dtype=torch.float64)).exp()
    A = (q.unsqueeze(3) * k.unsqueeze(2) * W).sum(-1)  # (B, H, T, T)
    o = A @ v
    if s0 is not None:
        o = o + (q * L.exp()) @ s0.double()
    return o


def run(mode, q, k, v, ld, s0=None, chunk_size=32, bidirectional=False, final=True):
    return decayed_linear_attention(
        q,
        k,
        v,
        ld,
        mode=mode,
        chunk_size=chunk_size,
        initial_state=s0,
        output_final_state=final,
        bidirectional=bidirectional,
    )


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-11


# ----------------------------------------------------------------------------------------------
# forms agree
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_forms_agree(kind, dtype, with_state, bidirectional):
    q, k, v, ld, s0 = make_inputs(kind, dtype)
    s0 = s0 if with_state else None
    ref = brute_force(q, k, v, ld, s0, bidirectional)
    outs = {m: run(m, q, k, v, ld, s0, bidirectional=bidirectional) for m in MODES}
    for m, (o, _st) in outs.items():
        assert o.dtype == dtype and o.shape == v.shape
        assert (o.double() - ref).abs().max() <= tol(dtype), m
    st_ref = outs["recurrent"][1]
    assert st_ref.shape == s0.shape if s0 is not None else True
    for m in ("parallel", "chunkwise"):
        assert (outs[m][1] - st_ref).abs().max() <= tol(dtype) * 10, m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,chunk", [(1, 64), (7, 64), (64, 16), (65, 16), (33, 5), (100, 64)])
def test_lengths_and_chunk_sizes(kind, T, chunk):
    q, k, v, ld, s0 = make_inputs(kind, torch.float64, T=T)
    o_r, s_r = run("recurrent", q, k, v, ld, s0)
    for m in ("parallel", "chunkwise"):
        o, s = run(m, q, k, v, ld, s0, chunk_size=chunk)
        assert (o - o_r).abs().max() < 1e-11
        assert (s - s_r).abs().max() < 1e-11


def test_separate_functions_match_dispatch():
    q, k, v, ld, s0 = make_inputs("key", torch.float64, T=40)
    for fn, m in (
        (parallel_retention, "parallel"),
        (chunkwise_retention, "chunkwise"),
        (recurrent_retention, "recurrent"),
    ):
        o1, s1 = fn(q, k, v, ld, chunk_size=16, initial_state=s0, output_final_state=True)
        o2, s2 = run(m, q, k, v, ld, s0, chunk_size=16)
        assert torch.equal(o1, o2) and torch.equal(s1, s2)
    o, s = chunkwise_retention(q, k, v, ld)
    assert s is None


def test_no_final_state_and_empty_sequence():
    q, k, v, ld, s0 = make_inputs("head", T=0)
    for m in MODES:
        o, s = run(m, q, k, v, ld, s0)
        assert o.shape == (2, 3, 0, 8)
        assert torch.equal(s, s0)
        o, s = run(m, q, k, v, ld, None, final=False)
        assert s is None


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


def _grads(mode, kind, dtype, bidirectional):
    q, k, v, ld, s0 = make_inputs(kind, dtype, T=70, B=1, H=2)
    leaves = [q, k, v, s0] + ([ld] if ld is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    o, st = run(mode, q, k, v, ld, s0, chunk_size=16, bidirectional=bidirectional)
    gen = torch.Generator().manual_seed(1)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype)
    ws = torch.randn(st.shape, generator=gen, dtype=torch.float64).to(st.dtype)
    ((o * wo).sum() + (st * ws).sum()).backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_agree(kind, dtype, bidirectional):
    gp = _grads("parallel", kind, dtype, bidirectional)
    gc = _grads("chunkwise", kind, dtype, bidirectional)
    gr = _grads("recurrent", kind, torch.float64, bidirectional) if dtype == torch.float64 else None
    for i, (a, b) in enumerate(zip(gp, gc)):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        rel = (a - b).norm() / b.norm().clamp_min(1e-30)
        assert rel < (1e-4 if dtype == torch.float32 else 1e-10), (i, rel.item())
        if gr is not None:
            rel = (gr[i] - b).norm() / b.norm().clamp_min(1e-30)
            assert rel < 1e-10, (i, rel.item())


# ----------------------------------------------------------------------------------------------
# state hand-off: split sequences, prefill + decode
# ----------------------------------------------------------------------------------------------


def _slice_ld(ld, a, b):
    return ld if ld is None or ld.dim() == 1 else ld[:, :, a:b]


@pytest.mark.parametrize("kind", KINDS)
def test_split_sequence(kind):
    q, k, v, ld, s0 = make_inputs(kind, torch.float64, T=100)
    o_all, s_all = run("chunkwise", q, k, v, ld, s0, chunk_size=16)
    cut = 37
    o1, s1 = run("chunkwise", q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], _slice_ld(ld, 0, cut), s0, 16)
    o2, s2 = run("chunkwise", q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], _slice_ld(ld, cut, 100), s1, 16)
    assert (torch.cat([o1, o2], 2) - o_all).abs().max() < 1e-11
    assert (s2 - s_all).abs().max() < 1e-11


@pytest.mark.parametrize("prefill_mode", ["chunkwise", "parallel"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_decode(kind, prefill_mode):
    q, k, v, ld, _ = make_inputs(kind, torch.float32, T=60)
    o_all, s_all = run("chunkwise", q, k, v, ld, None, chunk_size=16)
    P = 45
    o, s = run(prefill_mode, q[:, :, :P], k[:, :, :P], v[:, :, :P], _slice_ld(ld, 0, P), None, 16)
    outs = [o]
    for t in range(P, 60):
        o_t, s = decayed_linear_attention(
            q[:, :, t : t + 1],
            k[:, :, t : t + 1],
            v[:, :, t : t + 1],
            _slice_ld(ld, t, t + 1),
            mode="recurrent",
            initial_state=s,
            output_final_state=True,
        )
        outs.append(o_t)
    assert (torch.cat(outs, 2) - o_all).abs().max() < 1e-5
    assert (s - s_all).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# padding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_invariance(kind, bidirectional):
    q, k, v, ld, _ = make_inputs(kind, torch.float64, T=50, B=1)
    P = 13
    qp, kp, vp, ldp, _ = make_inputs(kind, torch.float64, T=50 + P, B=1, seed=5)
    # pads: q and decays arbitrary, k = v = 0
    qp = torch.cat([qp[:, :, :P], q], 2)
    kp = torch.cat([torch.zeros_like(kp[:, :, :P]), k], 2)
    vp = torch.cat([torch.zeros_like(vp[:, :, :P]), v], 2)
    if ld is not None and ld.dim() > 1:
        ldp = torch.cat([ldp[:, :, :P], ld], 2)
    else:
        ldp = ld
    for m in MODES:
        o, s = run(m, q, k, v, ld, None, chunk_size=16, bidirectional=bidirectional)
        op, sp = run(m, qp, kp, vp, ldp, None, chunk_size=16, bidirectional=bidirectional)
        assert (op[:, :, P:] - o).abs().max() < 1e-11, m
        assert (sp - s).abs().max() < 1e-11, m


# ----------------------------------------------------------------------------------------------
# numerical stability on long sequences
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["head", "key"])
def test_long_sequence_stability(kind):
    # head 0: gates pushed towards 0 (log a ~ -20: cumulative decays underflow within a few
    # tokens); head 1: towards 1 (log a ~ -1e-4: 16k tokens barely decay)
    B, H, T, D = 1, 2, 16384, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=gen) * D**-0.5
    k = torch.randn(B, H, T, D, generator=gen) * D**-0.5
    v = torch.randn(B, H, T, D, generator=gen)
    shape = (B, H, T) if kind == "head" else (B, H, T, D)
    center = torch.tensor([-20.0, -1e-4]).view((1, H, 1) if kind == "head" else (1, H, 1, 1))
    ld = center * torch.exp(0.1 * torch.randn(shape, generator=gen))  # <= 0, around center

    results = {}
    for prec in ("fp32", "bf16"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, ld)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
            o, s = decayed_linear_attention(*leaves, mode="chunkwise", output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(s).all(), prec
        (o.float().square().mean() + s.float().square().mean()).backward()
        for x in leaves:
            assert torch.isfinite(x.grad).all(), prec
        results[prec] = o.detach().float()
    ref = results["fp32"]
    for h in range(H):
        rel = (results["bf16"][:, h] - ref[:, h]).norm() / ref[:, h].norm()
        assert rel < 5e-3, (h, rel.item())
    # decays underflow in head 0: each output is just its own token's term
    diag = (q * k).sum(-1, keepdim=True) * v
    assert (ref[:, 0] - diag[:, 0]).abs().max() < 1e-5
    # float32 accumulation over 16k tokens stays close to float64
    o64, _ = decayed_linear_attention(q.double(), k.double(), v.double(), ld.double())
    for h in range(H):
        assert (ref[:, h] - o64[:, h]).norm() / o64[:, h].norm() < 1e-5


def test_bf16_inputs():
    q, k, v, ld, s0 = make_inputs("key", torch.float32, T=100)
    ref, s_ref = run("chunkwise", q, k, v, ld, s0)
    bf = [x.bfloat16() for x in (q, k, v, ld, s0)]
    for m in MODES:
        o, s = run(m, *bf)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert (o.float() - ref).norm() / ref.norm() < 2e-2, m
        assert (s - s_ref).norm() / s_ref.norm() < 2e-2, m


# ----------------------------------------------------------------------------------------------
# API: modes, errors
# ----------------------------------------------------------------------------------------------


def test_pick_mode_and_auto():
    assert pick_mode(1, 64, True) == "recurrent"
    assert pick_mode(1, 64, False) == "recurrent"
    assert pick_mode(2, 64, True) == "recurrent"
    assert pick_mode(3, 64, False) == "parallel"
    assert pick_mode(32, 64, False) == "parallel"
    assert pick_mode(100_000, 64, False) == "chunkwise"
    q, k, v, ld, s0 = make_inputs("head", torch.float64, T=300)
    for T in (1, 2, 30, 300):
        sl = lambda x, T=T: x[:, :, :T]  # noqa: E731
        o, s = run("auto", sl(q), sl(k), sl(v), sl(ld), s0)
        o_r, s_r = run("recurrent", sl(q), sl(k), sl(v), sl(ld), s0)
        assert (o - o_r).abs().max() < 1e-11 and (s - s_r).abs().max() < 1e-11


def test_bad_inputs():
    q, k, v, ld, s0 = make_inputs("key", T=10)
    with pytest.raises(ValueError, match="q"):
        decayed_linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k"):
        decayed_linear_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="v"):
        decayed_linear_attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="log_decay"):
        decayed_linear_attention(q, k, v, ld[..., :3])
    with pytest.raises(ValueError, match="log_decay"):
        decayed_linear_attention(q, k, v, ld[:, :, :, 0].unsqueeze(0))
    with pytest.raises(ValueError, match="log_decay"):
        decayed_linear_attention(q, k, v, torch.zeros(7))
    with pytest.raises(ValueError, match="initial_state"):
        decayed_linear_attention(q, k, v, ld, initial_state=s0[..., :2])
    with pytest.raises(ValueError, match="mode"):
        decayed_linear_attention(q, k, v, ld, mode="fast")
    for cs in (0, -4):
        with pytest.raises(ValueError, match="chunk_size"):
            decayed_linear_attention(q, k, v, ld, chunk_size=cs)
    with pytest.raises(ValueError, match="chunk_size"):
        chunkwise_retention(q, k, v, ld, chunk_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind):
    q, k, v, ld, s0 = make_inputs(kind, T=100)
    fn = torch.compile(decayed_linear_attention, fullgraph=True)
    o, s = fn(q, k, v, ld, mode="chunkwise", chunk_size=32, initial_state=s0, output_final_state=True)
    o_r, s_r = run("recurrent", q, k, v, ld, s0)
    assert (o - o_r).abs().max() < 1e-5 and (s - s_r).abs().max() < 1e-5
