"""Tests for hf_extras.models.retention_ops (decayed linear attention kernels)."""

import pytest
import torch
import torch.nn.functional as F

from hf_extras.models.retention_ops import (
    chunkwise_retention,
    decayed_linear_attention,
    grouped_decayed_linear_attention,
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
@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind, with_reset):
    """Inductor, fullgraph, with and without document boundaries: the recurrence's numbers."""
    torch._dynamo.reset()
    q, k, v, ld, s0 = make_inputs(kind, T=100)
    reset = _reset((10, 1, 1, 40, 48), q.shape[0]) if with_reset else None
    fn = torch.compile(decayed_linear_attention, fullgraph=True)
    o, s = fn(q, k, v, ld, mode="chunkwise", chunk_size=32, initial_state=s0, output_final_state=True, reset=reset)
    o_r, s_r = decayed_linear_attention(
        q, k, v, ld, mode="recurrent", initial_state=s0, output_final_state=True, reset=reset
    )
    assert (o - o_r).abs().max() < 1e-5 and (s - s_r).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# packed documents: boundaries (`reset`, or -inf log decays) reset the state
# ----------------------------------------------------------------------------------------------

# two layouts: adjacent length-1 documents, and boundaries on and next to chunk edges (chunk 16)
LAYOUTS = [(9, 1, 1, 25, 37), (16, 17, 1, 30)]


def _starts(lengths):
    return [sum(lengths[:i]) for i in range(len(lengths))]


def _reset(lengths, B):
    reset = torch.zeros(B, sum(lengths), dtype=torch.bool)
    reset[:, _starts(lengths)] = True
    return reset


def _doc(ld, a, b):
    return _slice_ld(ld, a, b)


def _packed_vs_alone(mode, kind, dtype, lengths, bidirectional, reset_first=True, use_inf=False, chunk=16):
    """(packed outputs, final state, grads) and the same from each document run alone with summed losses."""
    T = sum(lengths)
    q, k, v, ld, s0 = make_inputs(kind, dtype, B=2, H=2, T=T, seed=3)
    reset = _reset(lengths, 2)
    if not reset_first:
        reset[:, 0] = False
    gen = torch.Generator().manual_seed(7)
    wo = torch.randn(2, 2, T, v.shape[-1], generator=gen, dtype=torch.float64).to(dtype)
    ws = torch.randn(s0.shape, generator=gen, dtype=torch.float64)

    def leaves():
        out = [x.detach().clone().requires_grad_(True) for x in (q, k, v, s0)]
        return out + ([ld.detach().clone().requires_grad_(True)] if ld is not None else [None])

    # packed
    pq, pk, pv, ps0, pld = leaves()
    ld_in, reset_in = pld, reset
    if use_inf:  # boundaries as -inf log decays instead of `reset`
        ld_in = pld.masked_fill(reset.view(2, 1, T, *([1] * (pld.dim() - 3))), float("-inf"))
        reset_in = None
    o, st = decayed_linear_attention(
        pq, pk, pv, ld_in, mode=mode, chunk_size=chunk, initial_state=None if bidirectional else ps0,
        output_final_state=not bidirectional, bidirectional=bidirectional, reset=reset_in,
    )  # fmt: skip
    loss = (o * wo).sum() + ((st.double() * ws).sum() if st is not None else 0)
    loss.backward()
    grads = [(x.grad if x.grad is not None else torch.zeros_like(x)) for x in (pq, pk, pv, ps0, pld) if x is not None]
    packed = (o.detach(), st, grads)

    # one by one
    aq, ak, av, as0, ald = leaves()
    outs, total, st_a = [], 0, None
    for i, (a, n) in enumerate(zip(_starts(lengths), lengths)):
        b = a + n
        init = as0 if (i == 0 and not reset_first and not bidirectional) else None
        o_i, st_a = decayed_linear_attention(
            aq[:, :, a:b], ak[:, :, a:b], av[:, :, a:b], _doc(ald, a, b), mode=mode, chunk_size=chunk,
            initial_state=init, output_final_state=True, bidirectional=bidirectional,
        )  # fmt: skip
        outs.append(o_i)
        total = total + (o_i * wo[:, :, a:b]).sum()
    if not bidirectional:
        total = total + (st_a.double() * ws).sum()
    total.backward()
    grads = []
    for x in (aq, ak, av, as0, ald):
        if x is not None:
            grads.append(x.grad if x.grad is not None else torch.zeros_like(x))
    alone = (torch.cat(outs, 2).detach(), st_a if not bidirectional else None, grads)
    return packed, alone


def _assert_rel(a, b, rtol, what):
    scale = b.abs().max().clamp_min(1e-30)
    err = (a.double() - b.double()).abs().max() / scale
    assert err <= rtol, (what, err.item())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_packed_documents_equal_documents_alone(mode, kind, dtype, bidirectional):
    """Per document: outputs, the final state (the last document's) and the gradients of q, k, v, log decay
    and the initial state (discarded by the boundary at token 0: gradient 0) equal running it alone."""
    rtol = 1e-5 if dtype == torch.float32 else 1e-11
    for lengths in LAYOUTS:
        (o, st, g), (o_a, st_a, g_a) = _packed_vs_alone(mode, kind, dtype, lengths, bidirectional)
        _assert_rel(o, o_a, rtol, "o")
        if not bidirectional:
            _assert_rel(st, st_a, rtol, "final state")
        for name, x, y in zip(("q", "k", "v", "s0", "log_decay"), g, g_a):
            assert torch.isfinite(x).all(), name
            if name == "s0" and not bidirectional:
                assert torch.equal(x, torch.zeros_like(x)), "a boundary at token 0 discards the initial state"
            _assert_rel(x, y, rtol * 10, name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_packed_without_boundary_at_token_0_continues_the_initial_state(mode, kind):
    (o, st, g), (o_a, st_a, g_a) = _packed_vs_alone(mode, kind, torch.float64, LAYOUTS[0], False, reset_first=False)
    _assert_rel(o, o_a, 1e-11, "o")
    _assert_rel(st, st_a, 1e-11, "final state")
    for x, y in zip(g, g_a):
        _assert_rel(x, y, 1e-10, "grad")
    assert g[3].abs().max() > 0  # the initial state is used by the first document


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["head", "key"])
@pytest.mark.parametrize("mode", MODES)
def test_minus_inf_log_decay_is_a_boundary(mode, kind, dtype):
    """-inf in a data-dependent log decay resets the state like `reset` (causal): no NaN forward or backward."""
    rtol = 1e-5 if dtype == torch.float32 else 1e-11
    for lengths in LAYOUTS:
        (o, st, g), (o_a, st_a, g_a) = _packed_vs_alone(mode, kind, dtype, lengths, False, use_inf=True)
        _assert_rel(o, o_a, rtol, "o")
        _assert_rel(st, st_a, rtol, "final state")
        for name, x, y in zip(("q", "k", "v", "s0", "log_decay"), g, g_a):
            assert torch.isfinite(x).all(), name
            _assert_rel(x, y, rtol * 10, name)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_per_channel_zero_decay_matches_the_recurrence(bidirectional):
    """GLA: -inf in some key channels only zeroes those rows of the state (floored to a log decay whose exp is
    exactly 0); every form agrees with the recurrence, forward and backward, and with exp(-inf) = 0 written out."""
    q, k, v, ld, s0 = make_inputs("key", torch.float64, T=50, H=2)
    gen = torch.Generator().manual_seed(2)
    ld = ld.masked_fill(torch.rand(ld.shape, generator=gen) < 0.05, float("-inf"))
    ld[:, :, 0] = float("-inf")  # all channels at token 0: the initial state is dropped
    results = []
    for m in MODES:
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, s0, ld)]
        o, st = run(
            m, *leaves[:3], leaves[4], None if bidirectional else leaves[3], 16, bidirectional, not bidirectional
        )
        ((o * o).sum() + ((st * st).sum() if st is not None else 0)).backward()
        results.append([o.detach()] + [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves])
    for res in results[:2]:
        for x, y in zip(res, results[2]):
            assert torch.isfinite(x).all()
            _assert_rel(x, y, 1e-11, "vs recurrent")
    # the brute-force sum (decay products written out, exp(-inf) = 0) agrees with the forms
    if not bidirectional:
        a = ld.exp()
        S = torch.zeros_like(s0)
        outs = []
        for t in range(q.shape[2]):
            S = a[:, :, t, :, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
            outs.append(q[:, :, t, None, :] @ S)
        _assert_rel(results[0][0], torch.cat(outs, 2), 1e-11, "written out")
    # the -inf entries get no gradient; the initial state none either
    assert torch.equal(results[0][5][torch.isneginf(ld)], torch.zeros(int(torch.isneginf(ld).sum()), dtype=ld.dtype))
    assert torch.equal(results[0][4], torch.zeros_like(s0))


@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_documents_do_not_see_each_other(kind):
    """Changing one document (by a lot) leaves every other document's outputs unchanged, from either side."""
    lengths = LAYOUTS[0]
    T = sum(lengths)
    q, k, v, ld, _ = make_inputs(kind, torch.float64, T=T)
    reset = _reset(lengths, q.shape[0])
    a, b = _starts(lengths)[3], _starts(lengths)[4]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, a:b] *= 1e3
    v2[:, :, a:b] += 1e3
    ld2 = ld
    if ld is not None and ld.dim() > 1:
        ld2 = ld.clone()
        ld2[:, :, a:b] = ld2[:, :, a:b] * 0.01
    for m in MODES:
        o, _ = decayed_linear_attention(q, k, v, ld, mode=m, chunk_size=16, bidirectional=True, reset=reset)
        o2, _ = decayed_linear_attention(q, k2, v2, ld2, mode=m, chunk_size=16, bidirectional=True, reset=reset)
        keep = torch.ones(T, dtype=torch.bool)
        keep[a:b] = False
        assert (o[:, :, keep] - o2[:, :, keep]).abs().max() < 1e-12, m
        assert (o[:, :, ~keep] - o2[:, :, ~keep]).abs().max() > 1.0, m


def _pad_row(x, pads, dim, value=0.0):
    """Insert `n` pad entries (value) before position `at` for each (at, n) in pads (positions of the real row)."""
    pieces, last = [], 0
    for at, n in pads:
        pieces.append(x.narrow(dim, last, at - last))
        shape = list(x.shape)
        shape[dim] = n
        pieces.append(torch.full(shape, value, dtype=x.dtype))
        last = at
    pieces.append(x.narrow(dim, last, x.shape[dim] - last))
    return torch.cat(pieces, dim)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_padding_anywhere_never_touches_the_state(mode, kind, bidirectional):
    """Pads with k = v = 0 and log decay 0 (a = 1) -- left, interior and right, with an initial state and a
    boundary in the row -- leave every real token's output and the final state unchanged. A fixed (H,) decay
    becomes per token for that (log decay 0 at the pads: packing.log_decay_with_padding)."""
    from hf_extras.models.packing import log_decay_with_padding

    T = 60
    q, k, v, ld, s0 = make_inputs(kind, torch.float64, T=T)
    s0 = None if bidirectional else s0
    reset = _reset((20, 40), q.shape[0])
    pads = [(0, 5), (20, 3), (33, 1), (60, 7)]  # left, at the boundary, interior, right
    n_pad = sum(n for _, n in pads)
    gen = torch.Generator().manual_seed(9)
    qp = _pad_row(q, pads, 2)
    qp = torch.where(qp == 0, torch.randn(qp.shape, generator=gen, dtype=qp.dtype), qp)  # q at pads: anything
    kp, vp = _pad_row(k, pads, 2), _pad_row(v, pads, 2)
    mask = _pad_row(torch.ones(q.shape[0], T, dtype=torch.bool), pads, 1, value=False)
    resetp = _pad_row(reset, pads, 1, value=False)
    ldp = None
    if ld is not None:
        ld_full = ld if ld.dim() == 1 else _pad_row(ld, pads, 2, value=-5.0)  # garbage, masked below
        ldp = log_decay_with_padding(ld_full, mask)
    for r, rp in ((None, None), (reset, resetp)):
        o, st = decayed_linear_attention(
            q, k, v, ld, mode=mode, chunk_size=16, initial_state=s0,
            output_final_state=not bidirectional, bidirectional=bidirectional, reset=r,
        )  # fmt: skip
        op, stp = decayed_linear_attention(
            qp, kp, vp, ldp, mode=mode, chunk_size=16, initial_state=s0,
            output_final_state=not bidirectional, bidirectional=bidirectional, reset=rp,
        )  # fmt: skip
        assert op.shape[2] == T + n_pad
        assert (op[:, :, mask[0]] - o).abs().max() < 1e-11
        if not bidirectional:
            assert (stp - st).abs().max() < 1e-11


@pytest.mark.parametrize("kind", KINDS)
def test_16k_packed_tokens_bf16_stay_finite(kind):
    """16k tokens of packed documents (lengths 1..600) in bf16, chunkwise, forward and backward: finite, and
    close to float32."""
    B, H, T, D = 1, 2, 16384, 16
    gen = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < T:
        lengths.append(int(torch.randint(1, 600, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - T
    reset = _reset(lengths, B)
    q, k, v, ld, _ = make_inputs(kind, torch.float32, B=B, H=H, T=T, Dk=D, Dv=D, seed=1)
    outs = []
    for dtype in (torch.bfloat16, torch.float32):
        leaves = [x.to(dtype).requires_grad_(True) for x in (q, k, v) + ((ld,) if ld is not None else ())]
        o, s = decayed_linear_attention(
            *leaves[:3], leaves[3] if ld is not None else None, reset=reset, output_final_state=True
        )
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        (o.float().square().mean() + s.square().mean()).backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves)
        outs.append(o.float())
    assert (outs[0] - outs[1]).norm() / outs[1].norm() < 2e-2


def test_reset_is_checked():
    q, k, v, ld, _ = make_inputs("head", T=10)
    with pytest.raises(ValueError, match="reset must be a bool"):
        decayed_linear_attention(q, k, v, ld, reset=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="reset must be a bool"):
        decayed_linear_attention(q, k, v, ld, reset=torch.zeros(2, 9, dtype=torch.bool))


def test_compile_fullgraph_with_boundaries():
    """The chunkwise form with `reset` (and -inf log decays) traces as one graph, forward and backward."""
    torch._dynamo.reset()
    q, k, v, ld, s0 = make_inputs("head", T=40)
    reset = _reset((5, 1, 20, 14), 2)
    ld = ld.masked_fill(reset[:, None] & (torch.arange(40) > 10), float("-inf"))

    def f(q, k, v, ld, s0):
        o, s = chunkwise_retention(q, k, v, ld, chunk_size=16, initial_state=s0, output_final_state=True, reset=reset)
        return o.square().sum() + s.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (f, compiled):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, ld, s0)]
        fn(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# grouped queries / keys, per-head key scale (Mamba-2's SSD): against the per-head recurrence
# ---------------------------------------------------------------------------------------------


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_grouped(B=2, T=45, G=2, R=3, Dk=8, Dv=5, dtype=torch.float64, seed=0, key_scale=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G, Dk, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, G, Dk, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, G * R, Dv, generator=g, dtype=torch.float64)
    ld = -F.softplus(torch.randn(B, T, G * R, generator=g, dtype=torch.float64))
    ks = F.softplus(torch.randn(B, T, G * R, generator=g, dtype=torch.float64)) if key_scale else None
    s0 = torch.randn(B, G * R, Dk, Dv, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(ld), cast(ks), cast(s0)


def grouped_reference(q, k, v, ld, ks, s0, bidirectional, reset):
    """The same computation head by head: per-head queries and keys materialised, ``decayed_linear_attention``'s
    parallel form (itself checked against the brute force above; independent of the grouped chunkwise kernel and of
    the recurrent form the grouped function uses for decoding)."""
    R = v.shape[2] // q.shape[2]
    qh, kh = (x.transpose(1, 2).repeat_interleave(R, dim=1) for x in (q, k))
    if ks is not None:
        kh = kh * ks.transpose(1, 2).unsqueeze(-1)
    o, S = decayed_linear_attention(
        qh,
        kh,
        v.transpose(1, 2),
        ld.transpose(1, 2),
        mode="parallel",
        initial_state=s0,
        output_final_state=True,
        bidirectional=bidirectional,
        reset=reset,
    )
    return o.transpose(1, 2), S


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups", [(1, 4), (2, 3)])
@pytest.mark.parametrize("key_scale", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("T,chunk", [(1, 16), (45, 7), (45, 16)])
def test_grouped_matches_the_per_head_form(mode, groups, key_scale, bidirectional, with_state, with_reset, T, chunk):
    """Outputs, final state and every gradient (q, k, v, log decay, key scale) equal the per-head form in
    float64, for chunk lengths that do not divide T, groups of 1 and > 1, both directions, packed documents."""
    G, R = groups
    q, k, v, ld, ks, s0 = make_grouped(T=T, G=G, R=R, key_scale=key_scale)
    s0 = s0 if with_state else None
    reset = None
    if with_reset:
        reset = torch.zeros(2, T, dtype=torch.bool)
        reset[:, [i for i in (0, 5, 6, 20, 33) if i < T]] = True
    ours = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, ld, ks)]
    theirs = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, ld, ks)]
    o, S = grouped_decayed_linear_attention(
        *ours,
        mode=mode,
        chunk_size=chunk,
        initial_state=s0,
        output_final_state=True,
        bidirectional=bidirectional,
        reset=reset,
    )
    o_ref, S_ref = grouped_reference(*theirs, s0, bidirectional, reset)
    assert o.shape == v.shape and rel_err(o, o_ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12
    w = torch.randn_like(o)
    ((o * w).sum() + S.sum()).backward()
    ((o_ref * w).sum() + S_ref.sum()).backward()
    for name, a, b in zip("q k v log_decay key_scale".split(), ours, theirs):
        if a is not None:
            assert rel_err(a.grad, b.grad) <= 1e-10, name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_grouped_skip_scale_adds_d_v_once(mode, bidirectional):
    """`skip_scale` (Mamba-2's `D x`, (H, Dv)): the output plus `D v`, counted once when bidirectional, in every form,
    with its gradient and v's (float64)."""
    q, k, v, ld, ks, s0 = make_grouped(T=45)
    D = torch.randn(v.shape[2], v.shape[3], dtype=torch.float64)
    reset = torch.zeros(2, 45, dtype=torch.bool)
    reset[:, [5, 20]] = True
    results = []
    for fold in (True, False):
        leaves = [x.clone().requires_grad_() for x in (v, D)]
        o, _ = grouped_decayed_linear_attention(
            q, k, leaves[0], ld, ks, mode=mode, chunk_size=16, bidirectional=bidirectional, reset=reset,
            skip_scale=leaves[1] if fold else None,
        )  # fmt: skip
        if not fold:
            o = o + leaves[0] * leaves[1]
        results.append((o, *torch.autograd.grad((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum(), leaves)))
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-12
    with pytest.raises(ValueError, match="skip_scale must have shape"):
        grouped_decayed_linear_attention(q, k, v, ld, ks, skip_scale=D[:, :2])


def test_grouped_float32_boundaries_and_autocast():
    """float32 within 1e-5 of the per-head form, with -inf log decays (per head) as boundaries and under bf16
    autocast (the kernel computes in float32 there too); no NaN in the gradients."""
    q, k, v, ld, ks, s0 = make_grouped(T=50, dtype=torch.float32)
    ld = ld.clone()
    ld[:, [3, 17, 40], :2] = float("-inf")
    o_ref, S_ref = grouped_reference(q, k, v, ld, ks, s0, False, None)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, ld, ks)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, S = grouped_decayed_linear_attention(
            *inputs, mode="chunkwise", chunk_size=16, initial_state=s0, output_final_state=True
        )
    assert o.dtype == torch.float32 and rel_err(o, o_ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    assert (inputs[3].grad[:, [3, 17, 40], :2] == 0).all()  # a boundary's log decay gets no gradient


def test_grouped_gradcheck():
    q, k, v, ld, ks, s0 = (x.requires_grad_() for x in make_grouped(B=1, T=11, G=1, R=2, Dk=3, Dv=2))
    reset = torch.zeros(1, 11, dtype=torch.bool)
    reset[0, 6] = True

    def fn(*a):
        return grouped_decayed_linear_attention(
            *a[:5], chunk_size=4, initial_state=a[5], output_final_state=True, bidirectional=True, reset=reset
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, ld, ks, s0))


def test_grouped_bad_inputs():
    q, k, v, ld, ks, _ = make_grouped(T=10)
    with pytest.raises(ValueError, match="multiple of the 2 groups"):
        grouped_decayed_linear_attention(q, k, v[:, :, :5], ld[:, :, :5], ks[:, :, :5])
    with pytest.raises(ValueError, match="log_decay must have shape"):
        grouped_decayed_linear_attention(q, k, v, ld.transpose(1, 2), ks)
    with pytest.raises(ValueError, match="key_scale must have shape"):
        grouped_decayed_linear_attention(q, k, v, ld, ks[:, :5])
    with pytest.raises(ValueError, match="time-major"):
        grouped_decayed_linear_attention(q[0], k, v, ld, ks)


@pytest.mark.slow
def test_grouped_compile_fullgraph():
    q, k, v, ld, ks, s0 = make_grouped(T=40, dtype=torch.float32)
    reset = torch.zeros(2, 40, dtype=torch.bool)
    reset[:, 13] = True

    def fn(*a):
        return grouped_decayed_linear_attention(
            *a, chunk_size=16, initial_state=s0, output_final_state=True, bidirectional=True, reset=reset
        )

    o, S = torch.compile(fn, fullgraph=True)(q, k, v, ld, ks)
    o_ref, S_ref = fn(q, k, v, ld, ks)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5
