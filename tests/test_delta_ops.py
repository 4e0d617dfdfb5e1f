"""Tests for hf_extras.models.delta_ops (the gated delta rule: DeltaNet and Gated DeltaNet kernels)."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from hf_extras.models.delta_ops import (
    _unit_lower_inverse,
    chunkwise_gated_delta_rule,
    gated_delta_rule,
    parallel_gated_delta_rule,
    pick_mode,
    recurrent_gated_delta_rule,
)

MODES = ["parallel", "chunkwise", "recurrent"]
KINDS = ["none", "gated"]  # DeltaNet, Gated DeltaNet


def make_inputs(kind, dtype=torch.float32, B=2, H=3, T=50, Dk=16, Dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    beta = torch.sigmoid(torch.randn(B, H, T, generator=g, dtype=torch.float64))
    ld = F.logsigmoid(torch.randn(B, H, T, generator=g, dtype=torch.float64) + 2.0) if kind == "gated" else None
    s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(beta), cast(ld), cast(s0)


def brute_force(q, k, v, beta, ld, s0=None, bidirectional=False, scale=1.0):
    """Step by step in float64 with the transition matrix written out: S_t = a_t (I - b_t k_t k_t^T) S_{t-1} +
    b_t k_t v_t^T, o_t = scale q_t S_t; the anti-causal pass runs the same from the end with decays a_{t+1}...a_s,
    each output read before its token's write."""
    q, k, v, beta = q.double() * scale, k.double(), v.double(), beta.double()
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    g = torch.zeros(B, H, T, dtype=torch.float64) if ld is None else ld.double()
    eye = torch.eye(Dk, dtype=torch.float64)

    def step(S, t):
        kt = k[:, :, t, :, None]
        trans = eye - beta[:, :, t, None, None] * kt * kt.transpose(-1, -2)
        return g[:, :, t, None, None].exp() * trans @ S + beta[:, :, t, None, None] * kt * v[:, :, t, None, :]

    S = torch.zeros(B, H, Dk, Dv, dtype=torch.float64) if s0 is None else s0.double()
    out = torch.zeros(B, H, T, Dv, dtype=torch.float64)
    for t in range(T):
        S = step(S, t)
        out[:, :, t] = (q[:, :, t, None, :] @ S)[:, :, 0]
    if bidirectional:
        g_next = torch.cat([g[:, :, 1:], torch.zeros_like(g[:, :, :1])], dim=2)
        S = torch.zeros(B, H, Dk, Dv, dtype=torch.float64)
        for t in reversed(range(T)):
            if t < T - 1:
                kt = k[:, :, t + 1, :, None]
                trans = eye - beta[:, :, t + 1, None, None] * kt * kt.transpose(-1, -2)
                S = trans @ S + beta[:, :, t + 1, None, None] * kt * v[:, :, t + 1, None, :]
            S = g_next[:, :, t, None, None].exp() * S
            out[:, :, t] += (q[:, :, t, None, :] @ S)[:, :, 0]
    return out, S


def run(mode, q, k, v, beta, ld, s0=None, chunk_size=16, bidirectional=False, final=True, scale=1.0):
    return gated_delta_rule(
        q,
        k,
        v,
        beta,
        ld,
        mode=mode,
        chunk_size=chunk_size,
        scale=scale,
        initial_state=s0,
        output_final_state=final,
        bidirectional=bidirectional,
    )


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_forms_agree_with_brute_force(mode, kind, dtype, with_state, bidirectional):
    q, k, v, beta, ld, s0 = make_inputs(kind, dtype)
    s0 = s0 if with_state else None
    ref, _ = brute_force(q, k, v, beta, ld, s0, bidirectional, scale=0.5)
    o, S = run(mode, q, k, v, beta, ld, s0, bidirectional=bidirectional, scale=0.5)
    assert o.dtype == dtype and S.dtype == dtype
    assert rel_err(o, ref) <= TOL[dtype]
    # the final state is the causal direction's
    ref_c, S_ref = brute_force(q, k, v, beta, ld, s0)
    assert rel_err(S, S_ref) <= TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,chunk", [(1, 16), (7, 16), (16, 16), (17, 16), (50, 7), (50, 33), (64, 64), (100, 64)])
def test_lengths_not_multiple_of_chunk(kind, T, chunk):
    q, k, v, beta, ld, s0 = make_inputs(kind, torch.float64, T=T)
    ref, S_ref = brute_force(q, k, v, beta, ld, s0)
    for mode in MODES:
        o, S = run(mode, q, k, v, beta, ld, s0, chunk_size=chunk)
        assert rel_err(o, ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12, mode


def test_separate_functions_and_empty_sequence():
    q, k, v, beta, ld, s0 = make_inputs("gated", torch.float64, T=20)
    ref, S_ref = run("recurrent", q, k, v, beta, ld, s0)
    for fn in (chunkwise_gated_delta_rule, recurrent_gated_delta_rule, parallel_gated_delta_rule):
        o, S = fn(q, k, v, beta, ld, chunk_size=8, initial_state=s0, output_final_state=True)
        assert rel_err(o, ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12
    o, S = run("chunkwise", q, k, v, beta, ld, s0, final=False)
    assert S is None
    for mode in MODES:
        o, S = run(mode, q[:, :, :0], k[:, :, :0], v[:, :, :0], beta[:, :, :0], ld[:, :, :0], s0)
        assert o.shape == (2, 3, 0, 8) and torch.equal(S, s0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_agree_chunkwise_vs_recurrent(kind, bidirectional):
    inputs = [x.requires_grad_() if x is not None else None for x in make_inputs(kind, torch.float64, T=37)]
    q, k, v, beta, ld, s0 = inputs
    w = torch.randn(2, 3, 37, 8, dtype=torch.float64)
    grads = {}
    for mode in ("recurrent", "chunkwise", "parallel"):
        o, S = run(mode, q, k, v, beta, ld, s0, chunk_size=8, bidirectional=bidirectional)
        loss = (o * w).sum() + S.sum()
        grads[mode] = torch.autograd.grad(loss, [x for x in inputs if x is not None])
    for mode in ("chunkwise", "parallel"):
        for g_ref, g in zip(grads["recurrent"], grads[mode]):
            assert rel_err(g, g_ref) <= 1e-10


def test_gradcheck_chunkwise():
    q, k, v, beta, ld, s0 = (
        x.requires_grad_() for x in make_inputs("gated", torch.float64, B=1, H=1, T=11, Dk=4, Dv=3)
    )
    fn = lambda *a: run("chunkwise", *a, chunk_size=4, bidirectional=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, beta, ld, s0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefill_mode", ["chunkwise", "parallel"])
def test_prefill_then_decode(kind, prefill_mode):
    q, k, v, beta, ld, _ = make_inputs(kind, torch.float32, T=40)
    full, S_full = run("chunkwise", q, k, v, beta, ld)
    cut = 33
    sl = lambda x, a, b: None if x is None else x[:, :, a:b]  # noqa: E731
    o1, S = run(prefill_mode, *(sl(x, 0, cut) for x in (q, k, v, beta, ld)))
    outs = [o1]
    for t in range(cut, 40):
        o, S = run("auto", *(sl(x, t, t + 1) for x in (q, k, v, beta, ld)), s0=S)
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=2), full) <= 1e-5 and rel_err(S, S_full) <= 1e-5


def _pack(docs):
    return [torch.cat(parts, dim=2) if parts[0] is not None else None for parts in zip(*docs)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_boundaries_packed_row_equals_documents_alone(mode, kind, bidirectional):
    """A -inf log decay at each document's first token: every document gets its own outputs and gradients, no NaN."""
    lengths = [13, 1, 22, 9]
    docs = []
    for i, T in enumerate(lengths):
        q, k, v, beta, ld, _ = make_inputs("gated", torch.float32, B=1, T=T, seed=i)
        if kind == "none":
            ld = torch.zeros_like(beta)  # DeltaNet with boundaries: log decay 0 inside, -inf at the starts
        docs.append([q, k, v, beta, ld])
    packed = [x.clone().requires_grad_() for x in _pack(docs)]
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    log_decay = packed[4].clone()
    log_decay[:, :, starts] = float("-inf")
    o, _ = run(mode, *packed[:4], log_decay, chunk_size=8, bidirectional=bidirectional)
    w = torch.randn_like(o)
    (o * w).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in packed)
    for i, (start, T) in enumerate(zip(starts.tolist(), lengths)):
        alone = [x.clone().requires_grad_() for x in docs[i]]
        ld_alone = alone[4] if kind == "gated" else None
        o_alone, _ = run("recurrent", *alone[:4], ld_alone, bidirectional=bidirectional)
        assert rel_err(o[:, :, start : start + T], o_alone) <= 1e-5
        (o_alone * w[:, :, start : start + T]).sum().backward()
        for x, x_alone in zip(packed[:4], alone[:4]):
            # the packed q/k/v/beta gradients of this document's tokens equal those of the document alone
            assert rel_err(x.grad[:, :, start : start + T], x_alone.grad) <= 1e-4
        if kind == "gated":  # the log decay at a boundary gets no gradient; inside a document the same as alone
            assert packed[4].grad[:, :, start].abs().max() == 0
            if T > 1:
                assert rel_err(packed[4].grad[:, :, start + 1 : start + T], alone[4].grad[:, :, 1:]) <= 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pad_kind", ["kv", "beta"])
def test_pads_change_nothing(mode, kind, bidirectional, pad_kind):
    """Pads anywhere (k = v = 0, or beta = 0; log decay 0) leave every real token's output and the state unchanged."""
    q, k, v, beta, ld, s0 = make_inputs(kind, torch.float64, B=1, T=30)
    ref, S_ref = run("recurrent", q, k, v, beta, ld, s0, bidirectional=bidirectional)
    real = torch.ones(45, dtype=torch.bool)
    real[[0, 1, 2, 10, 11, 20, 40, 41, 42, 43, 44, 30, 31, 32, 33]] = False  # left, interior and right pads
    g = torch.Generator().manual_seed(5)

    def spread(x, fill_random):
        out = torch.randn(*x.shape[:2], 45, *x.shape[3:], generator=g, dtype=x.dtype) if fill_random else None
        if out is None:
            out = x.new_zeros(*x.shape[:2], 45, *x.shape[3:])
        out[:, :, real] = x
        return out

    random_pads = pad_kind == "beta"  # with beta = 0 a pad's k and v may be anything
    qp, kp, vp = spread(q, True), spread(k, random_pads), spread(v, random_pads)
    kp = F.normalize(kp, dim=-1) if random_pads else kp
    bp = spread(beta, pad_kind == "kv")
    ldp = spread(ld, False) if ld is not None else None
    o, S = run(mode, qp, kp, vp, bp, ldp, s0, chunk_size=8, bidirectional=bidirectional)
    assert rel_err(o[:, :, real], ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_long_bf16_finite(kind):
    """16k tokens in bf16 (with boundaries): finite outputs, state and gradients; close to float32."""
    q, k, v, beta, ld, _ = make_inputs(kind, torch.float32, B=1, H=2, T=16384, Dk=16, Dv=16)
    if ld is not None:
        ld = ld * 4  # strong forgetting: cumulative log decays reach -1e5 over the sequence
        ld[:, :, ::4000] = float("-inf")
    inputs = [x.to(torch.bfloat16).requires_grad_() if x is not None else None for x in (q, k, v, beta, ld)]
    o, S = run("chunkwise", *inputs, chunk_size=64)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o.float().sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(x.grad).all() for x in inputs if x is not None)
    o32, _ = run("chunkwise", *(x.to(torch.bfloat16).float() if x is not None else None for x in (q, k, v, beta, ld)))
    assert (o.float() - o32).abs().max() <= 0.02 * o32.abs().max()


def test_float32_under_bf16_autocast():
    """Autocast must not turn the kernel's matmuls into bf16 (CPU has no bf16 triangular solve, and the state is
    float32): the same numbers as without autocast."""
    q, k, v, beta, ld, s0 = make_inputs("gated", torch.float32, T=40)
    ref, S_ref = run("chunkwise", q, k, v, beta, ld, s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for mode in MODES:
            o, S = run(mode, q, k, v, beta, ld, s0, bidirectional=False)
            assert o.dtype == torch.float32 and rel_err(o, ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# the peer: transformers' Qwen3-Next reference implementations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("peer", ["recurrent", "chunk"])
def test_matches_transformers_gated_delta_rule(dtype, with_state, grouped, peer):
    qwen = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    fn = qwen.torch_recurrent_gated_delta_rule if peer == "recurrent" else qwen.torch_chunk_gated_delta_rule
    fn = inspect.unwrap(fn)  # transformers' PyTorch reference itself, not fla's Triton kernel swapped in when installed
    B, T, Hk, Hv, Dk, Dv = 2, 45, 2, (4 if grouped else 2), 16, 8
    gen = torch.Generator().manual_seed(3)
    # transformers' layout is time-first; raw (unnormalised) q/k: its use_qk_l2norm_in_kernel normalises them
    q = torch.randn(B, T, Hk, Dk, generator=gen, dtype=dtype)
    k = torch.randn(B, T, Hk, Dk, generator=gen, dtype=dtype)
    v = torch.randn(B, T, Hv, Dv, generator=gen, dtype=dtype)
    beta = torch.rand(B, T, Hv, generator=gen, dtype=dtype)
    g = -F.softplus(torch.randn(B, T, Hv, generator=gen, dtype=dtype))
    s0 = torch.randn(B, Hv, Dk, Dv, generator=gen, dtype=dtype) if with_state else None
    kwargs = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    if peer == "chunk":
        kwargs["chunk_size"] = 16
    o_ref, S_ref = fn(q, k, v, g=g, beta=beta, **kwargs)

    # ours: head-first, q/k L2-normalised by the caller (same eps), grouped heads repeated, q scaled by Dk^-0.5
    def l2(x):
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    rep = Hv // Hk
    qh = l2(q).repeat_interleave(rep, dim=2).transpose(1, 2)
    kh = l2(k).repeat_interleave(rep, dim=2).transpose(1, 2)
    for mode in MODES:
        o, S = gated_delta_rule(
            qh,
            kh,
            v.transpose(1, 2),
            beta.transpose(1, 2),
            g.transpose(1, 2),
            mode=mode,
            chunk_size=16,
            scale=Dk**-0.5,
            initial_state=s0,
            output_final_state=True,
        )
        # transformers computes in float32 whatever the input dtype: float32 tolerance in both cases
        assert rel_err(o.transpose(1, 2), o_ref) <= 1e-5, mode
        assert rel_err(S, S_ref) <= 1e-5, mode
        if dtype == torch.float64:  # ours stays in float64: against the exact float64 brute force, tighter
            ref, _ = brute_force(qh, kh, v.transpose(1, 2), beta.transpose(1, 2), g.transpose(1, 2), s0, scale=Dk**-0.5)
            assert rel_err(o, ref) <= 1e-12


# ---------------------------------------------------------------------------------------------
# helpers, dispatch, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 2, 5, 16, 37, 64, 100])
def test_unit_lower_inverse(C):
    A = torch.randn(3, C, C, dtype=torch.float64).tril(-1) * 0.3
    eye = torch.eye(C, dtype=torch.float64)
    assert (_unit_lower_inverse(A) @ (eye + A) - eye).abs().max() <= 1e-10


def test_pick_mode_and_auto():
    assert pick_mode(1, 64, False) == "recurrent"
    assert pick_mode(2, 64, True) == "recurrent"
    assert pick_mode(2, 64, False) == "parallel"
    assert pick_mode(64, 64, False) == "parallel"
    assert pick_mode(65, 64, False) == "chunkwise"
    q, k, v, beta, ld, s0 = make_inputs("gated", torch.float64, T=70)
    ref, _ = run("recurrent", q, k, v, beta, ld, s0)
    assert rel_err(run("auto", q, k, v, beta, ld, s0, chunk_size=16)[0], ref) <= 1e-12


def test_bad_inputs():
    q, k, v, beta, ld, s0 = make_inputs("gated", torch.float32, T=10)
    with pytest.raises(ValueError, match="mode must be one of"):
        gated_delta_rule(q, k, v, beta, ld, mode="fast")
    with pytest.raises(ValueError, match="beta must have shape"):
        gated_delta_rule(q, k, v, beta[..., :5], ld)
    with pytest.raises(ValueError, match="log_decay must be None"):
        gated_delta_rule(q, k, v, beta, ld[0])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gated_delta_rule(q, k, v, beta, ld, initial_state=s0[0])
    with pytest.raises(ValueError, match="k must have the same shape"):
        gated_delta_rule(q, k[..., :4], v, beta, ld)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gated_delta_rule(q, k, v, beta, ld, chunk_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind):
    q, k, v, beta, ld, s0 = make_inputs(kind, torch.float32, T=40)
    fn = torch.compile(lambda *a: run("chunkwise", *a, chunk_size=16, bidirectional=True), fullgraph=True)
    o, S = fn(q, k, v, beta, ld, s0)
    ref, S_ref = run("chunkwise", q, k, v, beta, ld, s0, chunk_size=16, bidirectional=True)
    assert rel_err(o, ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5
