"""The selective scan (`hf_extras.models.scan_ops`): every form against the token-by-token reference."""

from __future__ import annotations

import pytest
import torch

from hf_extras.models import scan_cpu_kernel
from hf_extras.models.scan_ops import linear_scan, pick_scan_mode, selective_scan

FAST = [("parallel", 64), ("chunkwise", 8), ("chunkwise", 5), ("chunkwise", 64)]
# the compiled CPU kernel runs float32 only (float64 falls back to chunkwise), so it joins the float32 comparisons
FAST32 = FAST + [("fused", 64)]


def kernel_or_skip():
    """The compiled kernel must build wherever a C compiler is on PATH; only a machine without one skips."""
    if scan_cpu_kernel.load_kernel() is None:
        import shutil

        assert not any(shutil.which(c) for c in ("cc", "gcc", "clang")), "a C compiler is present but the kernel failed"
        pytest.skip("no C compiler: the fused CPU kernel is unavailable (the PyTorch forms are used)")


def loop_scan(a, u, reverse=False):
    h = torch.zeros_like(u[:, 0])
    out = torch.empty_like(u)
    for t in reversed(range(u.shape[1])) if reverse else range(u.shape[1]):
        h = a[:, t] * h + u[:, t]
        out[:, t] = h
    return out


def make_inputs(batch=2, T=37, D=6, N=4, dtype=torch.float32, dt_scale=1.0, seed=0):
    """Unit-scale inputs; A in [-3, 0), dt in [0, 2 * dt_scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, D, generator=g, dtype=dtype)
    dt = torch.rand(batch, T, D, generator=g, dtype=dtype) * 2 * dt_scale
    A = -torch.rand(D, N, generator=g, dtype=dtype) * 3 - 0.01
    B = torch.randn(batch, T, N, generator=g, dtype=dtype)
    C = torch.randn(batch, T, N, generator=g, dtype=dtype)
    D_skip = torch.randn(D, generator=g, dtype=dtype)
    h0 = torch.randn(batch, D, N, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D_skip, h0)]


def run(inputs, mode, chunk_size=16, bidirectional=False, with_state=True):
    x, dt, A, B, C, D_skip, h0 = inputs
    for t in inputs:
        t.grad = None
    y, h = selective_scan(
        x,
        dt,
        A,
        B,
        C,
        D_skip,
        mode=mode,
        chunk_size=chunk_size,
        initial_state=h0 if with_state else None,
        output_final_state=with_state,
        bidirectional=bidirectional,
    )
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * weights).sum() + ((h * h).sum() if h is not None else 0)
    loss.backward()
    return y.detach(), (h.detach() if h is not None else None), [t.grad for t in inputs]


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 13, 64, 100])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_matches_loop(T, reverse):
    a, u = torch.rand(2, T, 3, dtype=torch.float64), torch.randn(2, T, 3, dtype=torch.float64)
    torch.testing.assert_close(linear_scan(a, u, reverse=reverse), loop_scan(a, u, reverse=reverse))


@pytest.mark.parametrize("mode, chunk_size", FAST)
def test_fast_forms_match_recurrent_float64(mode, chunk_size):
    inputs = make_inputs(dtype=torch.float64)
    ref_y, ref_h, ref_g = run(inputs, "recurrent")
    y, h, grads = run(inputs, mode, chunk_size)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, ref_h, rtol=1e-10, atol=1e-10)
    for name, g, r in zip(("x", "dt", "A", "B", "C", "D", "h0"), grads, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("mode, chunk_size", FAST32)
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", [(2, 70, 6, 4), (3, 150, 37, 16)], ids=["small", "blocks"])
def test_fast_forms_match_recurrent_float32(mode, chunk_size, with_state, shape):
    """Outputs and gradients (initial state included) agree at the 1e-5 scale on unit inputs; "blocks" spans
    several of the fused kernel's channel blocks (a partial one last) and checkpoint intervals."""
    if mode == "fused":
        kernel_or_skip()
    batch, T, D, N = shape
    inputs = make_inputs(batch=batch, T=T, D=D, N=N)
    ref_y, ref_h, ref_g = run(inputs, "recurrent", with_state=with_state)
    y, h, grads = run(inputs, mode, chunk_size, with_state=with_state)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    if with_state:
        torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("x", "dt", "A", "B", "C", "D", "h0"), grads, ref_g):
        if r is None:
            assert g is None, name
            continue
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g / scale, r / scale, rtol=1e-5, atol=1e-5, msg=name)


def explicit_bidirectional(x, dt, A, B, C, D_skip):
    """The documented combination written out pair by pair (float64, O(T^2)):

    y_t = sum_{s <= t} C_t . (prod_{s < r <= t} exp(dt_r A)) dt_s B_s x_s        (causal scan, token t included)
        + sum_{s >= t} C_t . (prod_{t <= r < s} exp(dt_r A)) dt_s B_s x_s        (anti-causal scan, token t included)
        - C_t . dt_t B_t x_t + D x_t                                               (token t counted once)
    """
    batch, T, D = x.shape
    log_a = dt[..., None] * A  # (batch, T, D, N)
    inputs = dt[..., None] * B[:, :, None, :] * x[..., None]  # dt_s B_s x_s, (batch, T, D, N)
    forward = torch.zeros(batch, T, D, dtype=x.dtype)
    backward = torch.zeros(batch, T, D, dtype=x.dtype)
    for t in range(T):
        for s in range(t + 1):  # first pass: causal, s <= t
            forward[:, t] += (torch.exp(log_a[:, s + 1 : t + 1].sum(1)) * inputs[:, s] * C[:, t, None, :]).sum(-1)
        for s in range(t, T):  # second pass: anti-causal, s >= t
            backward[:, t] += (torch.exp(log_a[:, t:s].sum(1)) * inputs[:, s] * C[:, t, None, :]).sum(-1)
    y = forward + backward - (inputs * C[:, :, None, :]).sum(-1)
    return y + x * D_skip


@pytest.mark.parametrize("mode, chunk_size", [("recurrent", 16)] + FAST)
def test_bidirectional_matches_explicit_two_pass_reference(mode, chunk_size):
    inputs = make_inputs(batch=2, T=19, D=3, N=2, dtype=torch.float64)
    x, dt, A, B, C, D_skip, _ = inputs
    with torch.no_grad():
        ref = explicit_bidirectional(x, dt, A, B, C, D_skip)
    y, h, grads = run(inputs, mode, chunk_size, bidirectional=True, with_state=False)
    assert h is None
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # and the gradients of the fast forms equal the reference form's
    _, _, ref_grads = run(inputs, "recurrent", bidirectional=True, with_state=False)
    for name, g, r in zip(("x", "dt", "A", "B", "C", "D"), grads[:6], ref_grads[:6]):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("mode", ["chunkwise", "fused"])
def test_bidirectional_float32_forms_agree(mode):
    if mode == "fused":
        kernel_or_skip()
    inputs = make_inputs(T=50)
    ref_y, _, ref_g = run(inputs, "recurrent", bidirectional=True, with_state=False)
    y, _, grads = run(inputs, mode, 16, bidirectional=True, with_state=False)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads[:6], ref_g[:6]):
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g / scale, r / scale, rtol=1e-5, atol=1e-5)


def test_prefill_then_steps_equals_one_pass():
    """A chunkwise prefill's final state seeds token-by-token decoding; the outputs equal a single pass."""
    x, dt, A, B, C, D_skip, _ = (t.detach() for t in make_inputs(T=40))
    full, _ = selective_scan(x, dt, A, B, C, D_skip, mode="recurrent")
    y, state = selective_scan(
        x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], D_skip, mode="chunkwise", chunk_size=8, output_final_state=True
    )
    outs = [y]
    for t in range(23, 40):
        y, state = selective_scan(
            x[:, t : t + 1],
            dt[:, t : t + 1],
            A,
            B[:, t : t + 1],
            C[:, t : t + 1],
            D_skip,
            initial_state=state,
            output_final_state=True,
        )
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_zero_dt_leaves_the_state_unchanged():
    """dt = 0 (a padded token) multiplies the state by exp(0) = 1 and adds nothing."""
    x, dt, A, B, C, _, h0 = (t.detach() for t in make_inputs(T=12))
    dt_pad = dt.clone()
    dt_pad[:, 4:9] = 0
    _, h_skip = selective_scan(
        torch.cat([x[:, :4], x[:, 9:]], 1),
        torch.cat([dt[:, :4], dt[:, 9:]], 1),
        A,
        torch.cat([B[:, :4], B[:, 9:]], 1),
        torch.cat([C[:, :4], C[:, 9:]], 1),
        initial_state=h0,
        output_final_state=True,
        mode="chunkwise",
        chunk_size=4,
    )
    _, h_pad = selective_scan(
        x, dt_pad, A, B, C, initial_state=h0, output_final_state=True, mode="chunkwise", chunk_size=4
    )
    torch.testing.assert_close(h_pad, h_skip, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "fused"])
@pytest.mark.parametrize("log_decay", [-50.0, -1e4])
def test_extreme_decays_are_exact_and_finite(mode, log_decay):
    """dt * A down to -50 per step (and far beyond): finite, equal to the recurrence, gradients finite."""
    if mode == "fused":
        kernel_or_skip()
    inputs = make_inputs(T=300, D=4, N=3)
    with torch.no_grad():
        inputs[2].copy_(torch.full_like(inputs[2], -1.0))
        inputs[1].mul_(-log_decay / 2)  # dt in [0, -log_decay)
    ref_y, ref_h, ref_g = run(inputs, "recurrent")
    y, h, grads = run(inputs, mode, 64)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert all(torch.isfinite(g).all() for g in grads)
    # inputs dt * x reach 1e4, so C . h sums terms of that size: compare at 1e-5 of the output's scale
    y_scale = ref_y.abs().max().clamp_min(1.0)
    torch.testing.assert_close(y / y_scale, ref_y / y_scale, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_g):
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g / scale, r / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["chunkwise", "fused"])
def test_long_sequence_float32_stays_close(mode):
    """4096 tokens, slow decays (long memory): the fast forms do not drift from the recurrence."""
    if mode == "fused":
        kernel_or_skip()
    x, dt, A, B, C, D_skip, _ = (t.detach() for t in make_inputs(batch=1, T=4096, D=4, N=2, dt_scale=0.01))
    ref, ref_h = selective_scan(x, dt, A, B, C, D_skip, mode="recurrent", output_final_state=True)
    y, h = selective_scan(x, dt, A, B, C, D_skip, mode=mode, chunk_size=64, output_final_state=True)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)


def test_reduced_precision_inputs_compute_in_float32():
    x, dt, A, B, C, D_skip, _ = (t.detach() for t in make_inputs(T=33))
    ref, _ = selective_scan(*(t.bfloat16().float() for t in (x, dt, A, B, C, D_skip)), mode="recurrent")
    y, _ = selective_scan(*(t.bfloat16() for t in (x, dt, A, B, C, D_skip)), mode="chunkwise", chunk_size=8)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_empty_sequence_and_bad_arguments():
    x, dt, A, B, C, D_skip, h0 = (t.detach() for t in make_inputs(T=5))
    y, h = selective_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D_skip, initial_state=h0, output_final_state=True)
    assert y.shape == (2, 0, 6) and torch.equal(h, h0)
    with pytest.raises(ValueError, match="mode"):
        selective_scan(x, dt, A, B, C, mode="fast")
    with pytest.raises(ValueError, match="A must have shape"):
        selective_scan(x, dt, A[:3], B, C)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(x, dt, A, B[:, :3], C)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(x, dt, A, B, C, initial_state=h0[:1])
    with pytest.raises(ValueError, match="bidirectional"):
        selective_scan(x, dt, A, B, C, initial_state=h0, bidirectional=True)


@pytest.mark.parametrize("mode", ["chunkwise", "parallel", "fused"])
def test_compiles_without_graph_breaks(mode):
    """fullgraph torch.compile (AOT autograd, no C++ toolchain needed) gives the eager numbers and gradients; the
    fused kernel is an opaque operator with a registered fake and backward."""
    if mode == "fused":
        kernel_or_skip()
    inputs = make_inputs(batch=1, T=20, D=4, N=2)
    x, dt, A, B, C, D_skip, h0 = inputs

    def f(x, dt, A, B, C, D_skip, h0):
        return selective_scan(
            x, dt, A, B, C, D_skip, mode=mode, chunk_size=8, initial_state=h0, output_final_state=True
        )

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        for t in inputs:
            t.grad = None
        y, h = fn(*inputs)
        (y.sum() + h.square().sum()).backward()
        results.append((y.detach(), [t.grad.clone() for t in inputs]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for g, r in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, r)


def test_thread_count_is_restored():
    """The chunk loop may run single-threaded (`SERIAL_MAX_ELEMENTS`); torch's thread count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = make_inputs(T=20)
        run(inputs, "chunkwise", 8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fused_kernel_is_picked_for_float32_cpu_and_falls_back_elsewhere(monkeypatch):
    kernel_or_skip()
    x = torch.zeros(1, 8, 4)
    assert pick_scan_mode(8, False, x, 16) == "fused"
    assert pick_scan_mode(1, True, x, 16) == "recurrent"  # decoding steps stay on the reference
    assert pick_scan_mode(8, False, x.double(), 16) == "chunkwise"
    assert pick_scan_mode(8, False, x, scan_cpu_kernel.MAX_STATE + 1) == "chunkwise"
    monkeypatch.setenv("HF_EXTRAS_CPU_KERNEL", "0")
    assert pick_scan_mode(8, False, x, 16) == "chunkwise"
    # an explicit "fused" falls back to the same numbers where the kernel does not apply
    inputs = make_inputs(T=30)
    ref_y, ref_h, _ = run(inputs, "chunkwise", 8)
    y, h, _ = run(inputs, "fused", 8)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)


def test_fused_kernel_results_do_not_depend_on_the_thread_count():
    """Channel-block and batch partial sums are added by torch in a fixed order: bit-identical for 1 or 2 threads."""
    kernel_or_skip()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(make_inputs(batch=2, T=90, D=40, N=16), "fused"))
    finally:
        torch.set_num_threads(before)
    (y1, h1, g1), (y2, h2, g2) = results
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_a_failed_kernel_build_falls_back_to_the_pytorch_forms(monkeypatch, tmp_path, caplog):
    """No working compiler (here `false`): a warning, `load_kernel()` is None, and auto/fused run chunkwise."""
    monkeypatch.setattr(scan_cpu_kernel, "_LIB", {})
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("HF_EXTRAS_CACHE", str(tmp_path))
    with caplog.at_level("WARNING"):
        assert scan_cpu_kernel.load_kernel() is None
    assert "did not build" in caplog.text
    assert pick_scan_mode(8, False, torch.zeros(1, 8, 4), 16) == "chunkwise"
    inputs = make_inputs(T=30)
    ref_y, _, ref_g = run(inputs, "recurrent")
    y, _, grads = run(inputs, "fused", 8)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# packed documents: `reset` drops the state at each document's first token
# --------------------------------------------------------------------------------------------

LAYOUTS = [(9, 1, 1, 25, 37), (16, 17, 1, 30)]  # adjacent length-1 documents; boundaries on chunk edges (chunk 8/16)
PACKED_FORMS = [("recurrent", 16), ("parallel", 64), ("chunkwise", 8), ("chunkwise", 5), ("fused", 64)]
NAMES = ("x", "dt", "A", "B", "C", "D", "h0")


def _starts(lengths):
    return [sum(lengths[:i]) for i in range(len(lengths))]


def _reset(lengths, batch):
    reset = torch.zeros(batch, sum(lengths), dtype=torch.bool)
    reset[:, _starts(lengths)] = True
    return reset


def _scan_loss(inputs, mode, chunk_size, bidirectional, reset, with_state, weights, sl=slice(None)):
    x, dt, A, B, C, D_skip, h0 = inputs
    y, h = selective_scan(
        x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D_skip, mode=mode, chunk_size=chunk_size,
        initial_state=h0 if with_state else None, output_final_state=not bidirectional,
        bidirectional=bidirectional, reset=reset,
    )  # fmt: skip
    return y, h, (y * weights[:, sl]).sum()


def _packed_and_alone(mode, chunk_size, dtype, lengths, bidirectional, reset_first=True):
    T = sum(lengths)
    inputs = make_inputs(batch=2, T=T, D=5, N=3, dtype=dtype, seed=4)
    weights = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    h_weights = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    reset = _reset(lengths, 2)
    if not reset_first:
        reset[:, 0] = False
    for t in inputs:
        t.grad = None
    y, h, loss = _scan_loss(inputs, mode, chunk_size, bidirectional, reset, not bidirectional, weights)
    (loss + ((h * h_weights).sum() if h is not None else 0)).backward()
    grad = lambda t: t.grad.clone() if t.grad is not None else torch.zeros_like(t)  # noqa: E731
    packed = (y.detach(), h.detach() if h is not None else None, [grad(t) for t in inputs])
    for t in inputs:
        t.grad = None
    ys, total, h_a = [], 0, None
    for i, (a, n) in enumerate(zip(_starts(lengths), lengths)):
        with_state = i == 0 and not reset_first and not bidirectional
        y_i, h_a, loss_i = _scan_loss(
            inputs, mode, chunk_size, bidirectional, None, with_state, weights, slice(a, a + n)
        )
        ys.append(y_i)
        total = total + loss_i
    if not bidirectional:
        total = total + (h_a * h_weights).sum()
    total.backward()
    alone = (torch.cat(ys, 1).detach(), h_a.detach() if h_a is not None else None, [grad(t) for t in inputs])
    return packed, alone


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode, chunk_size", PACKED_FORMS)
def test_packed_documents_equal_documents_alone(mode, chunk_size, dtype, bidirectional):
    """Per document: outputs, the final state and the gradients of x, dt, A, B, C, D (and of the initial state,
    discarded by the boundary at token 0) equal the documents run one by one with summed losses. The fused kernel
    runs float32 (float64 falls back to chunkwise)."""
    if mode == "fused":
        kernel_or_skip()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for lengths in LAYOUTS:
        (y, h, g), (y_a, h_a, g_a) = _packed_and_alone(mode, chunk_size, dtype, lengths, bidirectional)
        scale = y_a.abs().max()
        torch.testing.assert_close(y / scale, y_a / scale, rtol=tol, atol=tol)
        if not bidirectional:
            torch.testing.assert_close(h, h_a, rtol=tol, atol=tol)
            assert torch.equal(g[6], torch.zeros_like(g[6])), "a boundary at token 0 discards the initial state"
        for name, a, b in zip(NAMES, g, g_a):
            assert torch.isfinite(a).all(), name
            s = b.abs().max().clamp_min(1.0)
            torch.testing.assert_close(a / s, b / s, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("mode, chunk_size", PACKED_FORMS)
def test_packed_without_boundary_at_token_0_continues_the_initial_state(mode, chunk_size):
    if mode == "fused":
        kernel_or_skip()
    dtype = torch.float32 if mode == "fused" else torch.float64
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    (y, h, g), (y_a, h_a, g_a) = _packed_and_alone(mode, chunk_size, dtype, LAYOUTS[0], False, reset_first=False)
    torch.testing.assert_close(y, y_a, rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_a, rtol=tol, atol=tol)
    for name, a, b in zip(NAMES, g, g_a):
        s = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / s, b / s, rtol=tol, atol=tol, msg=name)
    assert g[6].abs().max() > 0


def _pad(t, pads, value=0.0):
    """Insert `n` entries of `value` along dim 1 before real position `at`, for each (at, n)."""
    pieces, last = [], 0
    for at, n in pads:
        pieces.append(t[:, last:at])
        pieces.append(torch.full((t.shape[0], n, *t.shape[2:]), value, dtype=t.dtype))
        last = at
    pieces.append(t[:, last:])
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("mode, chunk_size", PACKED_FORMS)
def test_padding_anywhere_never_touches_the_state(mode, chunk_size, bidirectional):
    """Pads with dt = 0 (x, B, C arbitrary) -- left, at a boundary, interior and right -- leave every real token's
    output and the final state unchanged, with and without boundaries in the row."""
    if mode == "fused":
        kernel_or_skip()
    dtype = torch.float32 if mode == "fused" else torch.float64
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    x, dt, A, B, C, D_skip, h0 = (t.detach() for t in make_inputs(T=40, dtype=dtype))
    h0 = None if bidirectional else h0
    pads = [(0, 4), (15, 2), (22, 1), (40, 6)]
    gen = torch.Generator().manual_seed(3)

    def noise(t):  # random values at the pads: the scan must ignore them (dt = 0 there)
        padded = _pad(t, pads)
        at_pad = _pad(torch.ones_like(t), pads) == 0
        return torch.where(at_pad, torch.randn(padded.shape, generator=gen, dtype=dtype), padded)

    xp, Bp, Cp, dtp = noise(x), noise(B), noise(C), _pad(dt, pads)
    real = _pad(torch.ones(1, 40, dtype=torch.bool), pads, False)[0]
    reset = _reset((15, 25), 2)
    for r, rp in ((None, None), (reset, _pad(reset, pads, False))):
        y, h = selective_scan(x, dt, A, B, C, D_skip, mode=mode, chunk_size=chunk_size, initial_state=h0,
                              output_final_state=not bidirectional, bidirectional=bidirectional, reset=r)  # fmt: skip
        yp, hp = selective_scan(xp, dtp, A, Bp, Cp, None, mode=mode, chunk_size=chunk_size, initial_state=h0,
                                output_final_state=not bidirectional, bidirectional=bidirectional, reset=rp)  # fmt: skip
        # D x at a pad is the caller's (the mixer zeroes or ignores it); compare the scan part at real tokens
        torch.testing.assert_close(yp[:, real] + x * D_skip, y, rtol=tol, atol=tol)
        if not bidirectional:
            torch.testing.assert_close(hp, h, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["chunkwise", "fused"])
def test_16k_packed_tokens_bf16_stay_finite(mode):
    """16k tokens of packed documents (lengths 1..600), bf16 inputs, forward and backward: finite."""
    if mode == "fused":
        kernel_or_skip()
    T = 16384
    gen = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < T:
        lengths.append(int(torch.randint(1, 600, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - T
    inputs = [t.detach().bfloat16().requires_grad_() for t in make_inputs(batch=1, T=T, D=8, N=4)]
    x, dt, A, B, C, D_skip, h0 = inputs
    y, h = selective_scan(x, dt, A, B, C, D_skip, mode=mode, initial_state=h0, output_final_state=True,
                          reset=_reset(lengths, 1))  # fmt: skip
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    (y.square().mean() + h.square().mean()).backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs if t.grad is not None)


def test_reset_is_checked():
    x, dt, A, B, C, _, _ = (t.detach() for t in make_inputs(T=5))
    with pytest.raises(ValueError, match="reset must be a bool"):
        selective_scan(x, dt, A, B, C, reset=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="reset must be a bool"):
        selective_scan(x, dt, A, B, C, reset=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["chunkwise", "parallel", "fused"])
def test_compiles_with_boundaries(mode):
    """fullgraph (aot_eager) with `reset`: the eager numbers and gradients."""
    if mode == "fused":
        kernel_or_skip()
    torch._dynamo.reset()
    inputs = make_inputs(batch=1, T=20, D=4, N=2)
    reset = _reset((3, 1, 9, 7), 1)

    def f(x, dt, A, B, C, D_skip, h0):
        return selective_scan(x, dt, A, B, C, D_skip, mode=mode, chunk_size=8, initial_state=h0,
                              output_final_state=True, reset=reset)  # fmt: skip

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        for t in inputs:
            t.grad = None
        y, h = fn(*inputs)
        (y.sum() + h.square().sum()).backward()
        results.append((y.detach(), [t.grad.clone() if t.grad is not None else None for t in inputs]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for g, r in zip(results[1][1], results[0][1]):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r)
    torch._dynamo.reset()
