"""The compiled CPU kernels of `mixer_cpu_kernels` (conv + SiLU, gated RMS norm with the D skip, SSD within chunks)
against float64 PyTorch references: outputs and gradients, strided inputs, thread-count independence, dispatch and
fallbacks."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from hf_extras.models import mixer_cpu_kernels
from hf_extras.models.conv_ops import causal_depthwise_conv
from hf_extras.models.modeling_mamba2 import GatedRMSNorm
from hf_extras.models.retention_ops import grouped_decayed_linear_attention


@pytest.fixture(autouse=True)
def kernels_or_skip():
    """The kernels must build wherever a C compiler is on PATH; only a machine without one skips."""
    if mixer_cpu_kernels.load_kernel() is None:
        assert not any(shutil.which(c) for c in ("cc", "gcc", "clang")), "a C compiler is present but no kernel"
        pytest.skip("no C compiler: the kernels are unavailable (the PyTorch forms are used)")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def threads(n):
    """Context: torch.set_num_threads(n), restored after."""

    class _Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return _Threads()


# --------------------------------------------------------------------------------------------
# conv + SiLU
# --------------------------------------------------------------------------------------------


def conv_reference(x, weight, bias):
    kernel = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (kernel - 1, 0)), weight, bias, groups=x.shape[-1]).transpose(1, 2)
    return F.silu(y)


@pytest.mark.parametrize(
    "batch, seq_len, channels, kernel, bias",
    [
        (1, 300, 40, 4, True),
        (2, 300, 48, 4, True),  # channels a multiple of 16: the register-blocked K = 4 form, two work items
        (2, 129, 24, 3, False),
        (3, 5, 16, 4, True),
        (1, 1, 8, 4, True),
        (2, 70, 8, 2, True),
    ],
)
def test_conv_silu_equals_conv1d_and_silu_with_gradients(batch, seq_len, channels, kernel, bias):
    """Read in place from a column slice of a wider row (Mamba-2's xBC inside in_proj's output)."""
    torch.manual_seed(0)
    wide = torch.randn(batch, seq_len, channels + 7, dtype=torch.float64)
    weight = torch.randn(channels, 1, kernel, dtype=torch.float64)
    b = torch.randn(channels, dtype=torch.float64) if bias else None
    x64 = wide[..., 3 : 3 + channels].clone().requires_grad_()
    params64 = [weight.clone().requires_grad_()] + ([b.clone().requires_grad_()] if bias else [])
    reference = conv_reference(x64, *params64, *([] if bias else [None]))
    grad_out = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, [x64, *params64], grad_out)

    wide32 = wide.float().requires_grad_()
    params32 = [p.detach().float().requires_grad_() for p in params64]
    y = mixer_cpu_kernels.conv_silu(wide32[..., 3 : 3 + channels], params32[0][:, 0, :].t(), *params32[1:] or [None])
    got = torch.autograd.grad(y, [wide32, *params32], grad_out.float())
    assert rel(y, reference) < 1e-6
    assert got[0][..., :3].abs().max() == 0 and got[0][..., 3 + channels :].abs().max() == 0
    assert rel(got[0][..., 3 : 3 + channels], expected[0]) < 1e-6
    for g, e in zip(got[1:], expected[1:]):
        assert rel(g, e) < 1e-6


@pytest.mark.parametrize("channels", [24, 32])  # 32: the register-blocked K = 4 form
def test_conv_silu_does_not_depend_on_the_thread_count(channels):
    """Per-item partial sums of the taps' gradient, added by torch in a fixed order: bit-identical for 1 or 2."""
    torch.manual_seed(0)
    x = torch.randn(2, 300, channels, requires_grad=True)
    taps, bias = torch.randn(4, channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    grad_out = torch.randn(2, 300, channels)
    results = []
    for n in (1, 2):
        with threads(n):
            y = mixer_cpu_kernels.conv_silu(x, taps, bias)
            results.append((y, *torch.autograd.grad(y, [x, taps, bias], grad_out)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_causal_conv_fuses_silu_only_where_the_kernel_applies(monkeypatch):
    """`activation="silu"`: the kernel for float32 training (no cache); the PyTorch conv + SiLU elsewhere (a cached
    prefill, float64, kernels off), all with the same numbers."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 12)
    weight, bias = torch.randn(12, 1, 4), torch.randn(12)
    reference = conv_reference(x.double(), weight.double(), bias.double())
    calls = []
    real = mixer_cpu_kernels.conv_silu
    monkeypatch.setattr("hf_extras.models.conv_ops.conv_silu", lambda *a: calls.append(1) or real(*a))
    y, tail = causal_depthwise_conv(x, weight, bias, keep_tail=False, activation="silu")
    assert calls == [1] and tail is None and rel(y, reference) < 1e-6
    y, tail = causal_depthwise_conv(x, weight, bias, keep_tail=True, activation="silu")  # a prefill keeps the tail
    assert calls == [1] and rel(y, reference) < 1e-6 and torch.equal(tail, x[:, -3:].transpose(1, 2))
    y, _ = causal_depthwise_conv(x.double(), weight.double(), bias.double(), keep_tail=False, activation="silu")
    assert calls == [1] and rel(y, reference) < 1e-12
    monkeypatch.setenv("HF_EXTRAS_CPU_KERNEL", "0")
    y, _ = causal_depthwise_conv(x, weight, bias, keep_tail=False, activation="silu")
    assert calls == [1] and rel(y, reference) < 1e-6
    with pytest.raises(ValueError, match="activation"):
        causal_depthwise_conv(x, weight, bias, activation="gelu")


@pytest.mark.parametrize("kernel, channels", [(2, 10), (4, 10), (5, 10), (4, 32)])  # (4, 32): the blocked form
def test_conv_kernel_stops_at_document_starts_with_gradients(kernel, channels):
    """Packed documents: the kernel (float32) equals the PyTorch conv's document masks (float64), outputs and every
    gradient, with starts closer together than the window, at the first token, at an item boundary (two items of 150
    tokens) and at or up to two tokens past the ends of the blocked form's runs of 64 tokens (forward: from 0 and 150;
    backward: down from 153 and 300)."""
    torch.manual_seed(0)
    x64 = torch.randn(2, 300, channels, dtype=torch.float64)
    weight64 = torch.randn(channels, 1, kernel, dtype=torch.float64)
    bias64 = torch.randn(channels, dtype=torch.float64)
    starts = torch.zeros(2, 300, dtype=torch.bool)
    starts[0, [0, 5, 6, 8, 26, 64, 89, 100, 150, 151, 174]] = True
    starts[1, [3, 25, 91, 128, 154, 172, 214, 236, 255, 299]] = True
    leaves64 = [t.clone().requires_grad_() for t in (x64, weight64, bias64)]
    reference, _ = causal_depthwise_conv(*leaves64, keep_tail=False, document_starts=starts, activation="silu")
    grad_out = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, leaves64, grad_out)
    leaves = [t.float().requires_grad_() for t in (x64, weight64, bias64)]
    y, _ = causal_depthwise_conv(*leaves, keep_tail=False, document_starts=starts, activation="silu")
    got = torch.autograd.grad(y, leaves, grad_out.float())
    assert rel(y, reference) < 1e-6
    for g, e in zip(got, expected):
        assert rel(g, e) < 1e-6
    alone, _ = causal_depthwise_conv(leaves[0][:1, 100:150], *leaves[1:], keep_tail=False, activation="silu")
    torch.testing.assert_close(y[:1, 100:150], alone, rtol=0, atol=0)  # a document alone: the same numbers


def test_conv_kernel_keeps_pads_out_of_real_tokens():
    """Left and right pads (zeroed inputs) through the kernel: the real tokens' outputs equal the unpadded row's."""
    torch.manual_seed(0)
    x = torch.randn(1, 9, 8)
    weight, bias = torch.randn(8, 1, 4), torch.randn(8)
    alone, _ = causal_depthwise_conv(x, weight, bias, keep_tail=False, activation="silu")
    padded = torch.cat([torch.randn(1, 3, 8), x, torch.randn(1, 2, 8)], dim=1)
    mask = torch.zeros(1, 14, dtype=torch.long)
    mask[:, 3:12] = 1
    y, _ = causal_depthwise_conv(padded, weight, bias, padding_mask=mask, keep_tail=False, activation="silu")
    torch.testing.assert_close(y[:, 3:12], alone, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# gated RMS norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gated_norm_kernel_equals_the_pytorch_norm_with_gradients(norm_before_gate, groups):
    """float32 kernel against `GatedRMSNorm`'s PyTorch form in float64, the gate read as a column slice."""
    torch.manual_seed(0)
    batch, seq_len, width = 2, 70, 32
    y64 = torch.randn(batch, seq_len, width, dtype=torch.float64, requires_grad=True)
    wide_z = torch.randn(batch, seq_len, width + 5, dtype=torch.float64)
    z64 = wide_z[..., 2 : 2 + width].clone().requires_grad_()
    norm64 = GatedRMSNorm(width, width // groups, 1e-6, norm_before_gate).double()
    with torch.no_grad():
        norm64.weight.normal_(1.0, 0.1)
    reference = norm64(y64, z64)
    grad_out = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, [y64, z64, norm64.weight], grad_out)

    norm = GatedRMSNorm(width, width // groups, 1e-6, norm_before_gate)
    with torch.no_grad():
        norm.weight.copy_(norm64.weight)
    y = y64.detach().float().requires_grad_()
    zw = wide_z.float().requires_grad_()
    out = norm(y, zw[..., 2 : 2 + width])
    got = list(torch.autograd.grad(out, [y, zw, norm.weight], grad_out.float()))
    assert got[1][..., :2].abs().max() == 0 and got[1][..., 2 + width :].abs().max() == 0
    got[1] = got[1][..., 2 : 2 + width]
    assert rel(out, reference) < 1e-6
    for g, e in zip(got, expected):
        assert rel(g, e) < 2e-6


def test_gated_norm_kernel_is_used_and_does_not_depend_on_the_thread_count(monkeypatch):
    torch.manual_seed(0)
    norm = GatedRMSNorm(16, 8)
    y, z = (torch.randn(3, 90, 16, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(3, 90, 16)
    calls = []
    real = mixer_cpu_kernels.gated_rms_norm
    monkeypatch.setattr("hf_extras.models.modeling_mamba2.gated_rms_norm", lambda *a: calls.append(1) or real(*a))
    results = []
    for n in (1, 2):
        with threads(n):
            out = norm(y, z)
            results.append((out, *torch.autograd.grad(out, [y, z, norm.weight], grad_out)))
    assert calls == [1, 1]
    assert all(torch.equal(a, b) for a, b in zip(*results))
    monkeypatch.setenv("HF_EXTRAS_CPU_KERNEL", "0")
    torch.testing.assert_close(norm(y, z), results[0][0], rtol=1e-5, atol=1e-6)
    assert calls == [1, 1]


# --------------------------------------------------------------------------------------------
# SSD within chunks (inside grouped_decayed_linear_attention)
# --------------------------------------------------------------------------------------------


def ssd_inputs(batch=2, seq_len=45, groups=2, heads=4, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, groups, dk, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq_len, groups, dk, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq_len, heads, dv, generator=g, dtype=torch.float64)
    dt = torch.rand(batch, seq_len, heads, generator=g, dtype=torch.float64) * 0.5
    log_decay = -dt * torch.rand(heads, generator=g, dtype=torch.float64) * 2
    return q, k, v, log_decay, dt


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("key_scale", [True, False])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("dv, chunk", [(6, 16), (64, 16), (64, 64)])  # Dv 64 and C = Dv = 64 are compiled apart
@pytest.mark.parametrize("skip", [False, True], ids=["", "skip"])
def test_ssd_with_the_intra_kernel_equals_float64_with_gradients(
    bidirectional, key_scale, documents, dv, chunk, skip, monkeypatch
):
    """float32 (the within-chunk part by the kernel) against float64 (PyTorch): outputs, final state and every
    gradient, with an initial state, odd length, groups, document boundaries and the strict anti-causal pass; with
    `skip_scale` (Mamba-2's `D x`, added by the kernel) against the float64 output without it plus `D v`."""
    q, k, v, log_decay, dt = ssd_inputs(seq_len=45 if chunk == 16 else 150, dv=dv)
    S0 = torch.randn(2, 4, 8, dv, dtype=torch.float64)
    D = torch.randn(4, dv, dtype=torch.float64)
    reset = None
    if documents:
        reset = torch.zeros(2, q.shape[1], dtype=torch.bool)
        reset[0, [7, 30] + ([64, 100] if q.shape[1] > 100 else [])] = True
        reset[1, 44] = True
    calls = []
    real = mixer_cpu_kernels.ssd_intra
    monkeypatch.setattr("hf_extras.models.retention_ops.ssd_intra", lambda *a: calls.append(1) or real(*a))

    def run(dtype, fold):  # fold: the skip inside the scan; else added after it (the reference)
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, log_decay, dt, S0, D)]
        o, final = grouped_decayed_linear_attention(
            *leaves[:4],
            leaves[4] if key_scale else None,
            chunk_size=chunk,
            initial_state=None if bidirectional else leaves[5],
            output_final_state=not bidirectional,
            bidirectional=bidirectional,
            reset=reset,
            skip_scale=leaves[6] if skip and fold else None,
        )
        if skip and not fold:
            o = o + leaves[2] * leaves[6]
        loss = (o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum()
        if final is not None:
            loss = loss + (final * 0.3).sum()
        used = [
            t
            for i, t in enumerate(leaves)
            if (i != 4 or key_scale) and (i != 5 or not bidirectional) and (i != 6 or skip)
        ]
        return o, final, torch.autograd.grad(loss, used)

    o64, f64, g64 = run(torch.float64, fold=False)
    assert calls == []  # float64 stays on the PyTorch form
    o32, f32, g32 = run(torch.float32, fold=True)
    assert calls == [1, 1] if bidirectional else calls == [1]
    assert rel(o32, o64) < 1e-5
    if f64 is not None:
        assert rel(f32, f64) < 1e-5
    for a, b in zip(g32, g64):
        assert rel(a, b) < 1e-5
    if skip:  # the PyTorch form's own skip (float64, no kernel)
        for a, b in zip(run(torch.float64, fold=True)[2], g64):
            assert rel(a, b) < 1e-12


def test_ssd_intra_kernel_matches_the_pytorch_form_in_float32(monkeypatch):
    """Same float32 inputs with the kernel on and off (`HF_EXTRAS_CPU_KERNEL=0`): equal to float rounding."""
    q, k, v, log_decay, dt = (t.float() for t in ssd_inputs(seq_len=130))

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, dt)]
        o, _ = grouped_decayed_linear_attention(*leaves, chunk_size=64)
        return o, torch.autograd.grad(o.square().sum(), leaves)

    on = run()
    monkeypatch.setenv("HF_EXTRAS_CPU_KERNEL", "0")
    off = run()
    assert rel(on[0], off[0]) < 1e-6
    for a, b in zip(on[1], off[1]):
        assert rel(a, b) < 1e-5


def test_a_failed_build_leaves_the_pytorch_forms(monkeypatch, tmp_path, caplog):
    """No working compiler (here `false`): a warning, no kernel, and the conv, norm and SSD still run."""
    monkeypatch.setattr(mixer_cpu_kernels, "_LIB", {})
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("HF_EXTRAS_CACHE", str(tmp_path))
    with caplog.at_level("WARNING"):
        assert mixer_cpu_kernels.load_kernel() is None
    assert "did not build" in caplog.text
    assert not mixer_cpu_kernels.kernels_apply(torch.zeros(1))
    x = torch.randn(1, 10, 4)
    y, _ = causal_depthwise_conv(x, torch.randn(4, 1, 4), None, keep_tail=False, activation="silu")
    assert y.shape == x.shape
    assert GatedRMSNorm(4, 4)(x, x).shape == x.shape
    q, k, v, log_decay, dt = (t.float() for t in ssd_inputs())
    o, _ = grouped_decayed_linear_attention(q, k, v, log_decay, dt, chunk_size=16)
    assert torch.isfinite(o).all()


def test_ssd_backward_under_bf16_autocast_stays_in_float32():
    """A backward run inside `torch.autocast("cpu", bfloat16)` (a mixed-precision training step) computes the SSD's
    gradients in float32, as the forward does: the same numbers as outside autocast."""
    q, k, v, log_decay, dt = (t.float() for t in ssd_inputs(dv=64))

    def grads(autocast):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, dt)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, _ = grouped_decayed_linear_attention(*leaves, chunk_size=16)
            return torch.autograd.grad(o.square().sum(), leaves)

    for a, b in zip(grads(True), grads(False)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_groups, batch, seq_len", [(1, 1, 64), (2, 2, 70)])
def test_mamba2_training_step_with_kernels_equals_the_pytorch_forms(n_groups, batch, seq_len, monkeypatch):
    """A whole Mamba-2 LM step in float32 with every kernel (the in_proj split + conv + SiLU, the SSD's within-chunk
    part, the gated norm with D) against `HF_EXTRAS_CPU_KERNEL=0`: loss, logits and every gradient."""
    from hf_extras import HfxMamba2Config, HfxMamba2ForCausalLM

    torch.manual_seed(0)
    config = HfxMamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, n_groups=n_groups, state_size=8,
        chunk_size=16,
    )  # fmt: skip
    model = HfxMamba2ForCausalLM(config)
    ids = torch.randint(0, 64, (batch, seq_len))
    calls = []
    real = mixer_cpu_kernels.mamba2_in_conv
    monkeypatch.setattr("hf_extras.models.modeling_mamba2.mamba2_in_conv", lambda *a: calls.append(1) or real(*a))

    def step():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_on, grads_on = step()
    assert calls == [1, 1]
    monkeypatch.setenv("HF_EXTRAS_CPU_KERNEL", "0")
    logits_off, grads_off = step()
    assert calls == [1, 1]
    assert rel(logits_on, logits_off) < 1e-5
    for name, grad in grads_off.items():
        assert rel(grads_on[name], grad) < 1e-4, name


def test_ssd_kernels_read_values_in_place_from_a_wider_row(monkeypatch):
    """v as a column slice of a wider token row (Mamba-2's x inside xBC on the padded path), batch 1, one group: the
    kernels read it in place (row stride of the wide row) and give the same numbers as a contiguous copy."""
    q, k, v, log_decay, dt = (t.float() for t in ssd_inputs(batch=1, seq_len=64, groups=1, dv=16))
    wide = torch.cat([v.flatten(2), torch.randn(1, 64, 24)], dim=-1)  # (1, 64, 4 * 16 + 24)
    strides = []
    real = mixer_cpu_kernels._chunk_rows
    monkeypatch.setattr(mixer_cpu_kernels, "_chunk_rows", lambda t: strides.append(real(t)[1]) or real(t))

    def run(values):
        leaves = [t.clone().requires_grad_() for t in (q, k, log_decay, dt)]
        values = values.detach().requires_grad_()
        o, _ = grouped_decayed_linear_attention(
            leaves[0], leaves[1], values[..., :64].view(1, 64, 4, 16), *leaves[2:], chunk_size=16
        )
        return o, torch.autograd.grad(o.square().sum(), [*leaves, values])

    got = run(wide)
    assert strides == [88] * 4  # the state writes and the within-chunk part, forward and backward
    expected = run(v.flatten(2))
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1][:4], expected[1][:4]):
        assert torch.equal(a, b)
    assert torch.equal(got[1][4][..., :64], expected[1][4]) and got[1][4][..., 64:].abs().max() == 0


@pytest.mark.parametrize("documents", [False, True])
# the second: the register-blocked conv; the third: no z (Mamba-2 projects z apart from a plain in_proj)
@pytest.mark.parametrize("widths", [[12, 12, 5, 3], [32, 32, 16, 3], [0, 32, 16, 3]])
def test_mamba2_in_conv_equals_split_then_conv_with_gradients(documents, widths):
    """`mamba2_in_conv` against the split + conv + SiLU + split it replaces (float64 PyTorch): the five outputs and
    the gradients of the in_proj output, the taps and the bias, with every output's gradient used."""
    torch.manual_seed(0)
    z_width, x_width, bc_width, dt_width = widths
    conv_width = x_width + 2 * bc_width
    zxbcdt64 = torch.randn(2, 300, z_width + conv_width + dt_width, dtype=torch.float64, requires_grad=True)
    weight64 = torch.randn(conv_width, 1, 4, dtype=torch.float64, requires_grad=True)
    bias64 = torch.randn(conv_width, dtype=torch.float64, requires_grad=True)
    starts = None
    if documents:
        starts = torch.zeros(2, 300, dtype=torch.bool)
        starts[0, [0, 40, 41, 256]] = True
    z, xbc, dt = zxbcdt64.split([z_width, conv_width, dt_width], dim=-1)
    conv, _ = causal_depthwise_conv(xbc, weight64, bias64, keep_tail=False, document_starts=starts, activation="silu")
    reference = (z, *conv.split([x_width, bc_width, bc_width], dim=-1), dt)
    grads_out = [torch.randn_like(r) for r in reference]
    expected = torch.autograd.grad(reference, [zxbcdt64, weight64, bias64], grads_out)
    leaves = [t.detach().float().requires_grad_() for t in (zxbcdt64, weight64, bias64)]
    got_out = mixer_cpu_kernels.mamba2_in_conv(leaves[0], leaves[1][:, 0, :].t(), leaves[2], widths, starts)
    got = torch.autograd.grad(got_out, leaves, [g.float() for g in grads_out])
    for a, b in zip(got_out, reference):
        assert a.shape == b.shape and (a.numel() == 0 or rel(a, b) < 1e-6)
    for a, b in zip(got, expected):
        assert rel(a, b) < 1e-6


def test_rms_norm_kernel_equals_the_pytorch_norm_with_gradients(monkeypatch):
    """`RMSNorm` (every block's pre-norm) in float32 by the kernel against its PyTorch form in float64."""
    from hf_extras.models.norms import RMSNorm

    torch.manual_seed(0)
    norm64 = RMSNorm(48, eps=1e-5).double()
    with torch.no_grad():
        norm64.weight.normal_(1.0, 0.2)
    x64 = torch.randn(3, 300, 48, dtype=torch.float64, requires_grad=True)
    reference = norm64(x64)  # float64: the PyTorch form
    grad_out = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, [x64, norm64.weight], grad_out)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(norm64.weight)
    x = x64.detach().float().requires_grad_()
    calls = []
    real = mixer_cpu_kernels.rms_norm
    monkeypatch.setattr("hf_extras.models.norms.rms_norm", lambda *a: calls.append(1) or real(*a))
    out = norm(x)
    got = torch.autograd.grad(out, [x, norm.weight], grad_out.float())
    assert calls == [1]
    assert rel(out, reference) < 1e-6
    for a, b in zip(got, expected):
        assert rel(a, b) < 1e-6


def _load_copy(tmp_path, name: str, rename: dict[str, str]):
    """This module as a checkpoint carries it (beside `cpu_kernel_build.py`, imported as another package), with the
    operator names rewritten by `rename` (an older or newer copy)."""
    import importlib
    import sys
    from pathlib import Path

    source = Path(mixer_cpu_kernels.__file__)
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(source.parent / "cpu_kernel_build.py", package / "cpu_kernel_build.py")
    text = source.read_text()
    for old, new in rename.items():
        text = text.replace(old, new)
    (package / "mixer_cpu_kernels.py").write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(f"{name}.mixer_cpu_kernels")
    finally:
        sys.path.remove(str(tmp_path))


def test_copies_of_this_module_in_one_process_each_work(tmp_path):
    """A checkpoint's copy of this file imported beside the package's: with the same operator names it finds them
    defined and uses them; with other names (a copy from before or after a change, which renames every operator) it
    defines its own beside them. Both give the package's numbers."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 32)
    taps, bias = torch.randn(4, 32), torch.randn(32)
    y, z, weight = torch.randn(2, 40, 32), torch.randn(2, 40, 32), torch.randn(32)
    expected = (
        mixer_cpu_kernels.conv_silu(x, taps, bias),
        mixer_cpu_kernels.gated_rms_norm(y, z, weight, 2, 1e-6, False),
    )
    renamed = {
        f"{op}_v": f"{op}_v9"
        for op in ("conv_silu", "mamba2_in_conv", "rms_norm", "ssd_intra", "ssd_state_writes", "ssd_chunk_states")
    }
    for name, rename in (("same_names", {}), ("other_names", renamed)):
        copy = _load_copy(tmp_path, name, rename)
        got = (copy.conv_silu(x, taps, bias), copy.gated_rms_norm(y, z, weight, 2, 1e-6, False))
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name
    assert hasattr(torch.ops.hf_extras, "conv_silu_v94")  # the renamed copy defined its own
