"""Causal depthwise convolution over time with a cacheable tail, padding and document boundaries (GLA's short q/k/v
conv, Mamba's conv1d, Gated DeltaNet's and Mamba-2's convs)."""

import torch
import torch.nn.functional as F

from .mixer_cpu_kernels import conv_kernel_applies, conv_silu
from .packing import document_ids, has_interior_pads


def causal_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tail: torch.Tensor | None = None,
    *,
    padding_mask: torch.Tensor | None = None,
    document_starts: torch.Tensor | None = None,
    keep_tail: bool = True,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convolve `x` `(batch, time, channels)` causally with a depthwise `weight` `(channels, 1, kernel)`
    (`nn.Conv1d`'s), then apply `activation` (`None` or `"silu"`) to the output.

    `tail` holds the previous `kernel - 1` inputs `(batch, channels, kernel - 1)` (zeros at the start of a sequence),
    so a prefill followed by one-token steps gives the same outputs as one pass. Returns `(y, new_tail)`, `y` in the
    input's `(batch, time, channels)` layout; `new_tail` is `None` when `keep_tail` is False (no cache to write).

    `padding_mask` `(batch, time)` (1 = real): a pad's input is zeroed, so it reaches no later token, and the new
    tail holds the last real inputs (a right- or interior-padded prefill then continues as the unpadded one).
    `document_starts` `(batch, time)` bool (True at the first token of each packed document, see `packing.py`) stops
    the window there: a tap that would read an earlier document's input reads zero, as if the document ran alone,
    and the new tail keeps only the last document's inputs (the old tail belongs to the row's first document).

    Written as `kernel` shifted multiply-adds in the channels-last layout: the same numbers as
    `F.conv1d(..., groups=channels)` (to float rounding), without two transposes and without the depthwise `conv1d`
    weight-gradient kernel, which is very slow on multi-threaded CPUs (measurements: benchmarks/results/NOTES.md).
    Training in float32 on a CPU (no cache) with `activation="silu"` runs conv and SiLU as one compiled
    kernel (`mixer_cpu_kernels`), which reads `x` in place even as a column slice of a wider tensor.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if padding_mask is not None:
        x = x * padding_mask[..., None].to(x.dtype)
    if tail is None and not keep_tail and activation == "silu":  # training: no cache
        if (padding_mask is None or not has_interior_pads(padding_mask)) and conv_kernel_applies(x, weight, bias):
            return conv_silu(x, weight[:, 0, :].t(), bias, document_starts), None
    if padding_mask is not None and has_interior_pads(padding_mask):
        y, new_tail = _conv_over_real_tokens(x, weight, bias, tail, padding_mask, document_starts, keep_tail)
    else:
        y, new_tail = _conv(x, weight, bias, tail, padding_mask, document_starts, keep_tail)
    return (F.silu(y) if activation == "silu" else y), new_tail


def cached_causal_conv(
    x: torch.Tensor,
    conv1d: torch.nn.Conv1d,
    cache,
    layer_idx: int,
    *,
    padding_mask: torch.Tensor | None = None,
    document_starts: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """`causal_depthwise_conv` with a mixer's `nn.Conv1d` through its layer's conv slot of a `RecurrentCache`: the
    previous tail is read and the new one written (no cache: training, from a zero start, nothing kept)."""
    tail = cache.read_conv(layer_idx) if cache is not None else None
    y, new_tail = causal_depthwise_conv(
        x,
        conv1d.weight,
        conv1d.bias,
        tail,
        padding_mask=padding_mask,
        document_starts=document_starts,
        keep_tail=cache is not None,
        activation=activation,
    )
    if cache is not None:
        cache.write_conv(layer_idx, new_tail, conv1d.weight.shape[-1] - 1)
    return y


def cached_conv_act(
    x: torch.Tensor,
    conv1d: torch.nn.Conv1d,
    cache,
    layer_idx: int,
    hidden_act: str,
    act,
    *,
    padding_mask: torch.Tensor | None = None,
    document_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba's and Mamba-2's conv: `act(cached_causal_conv(x))` (SiLU fused with the conv where a compiled kernel
    applies), zero at padded positions, so that a pad's activated bias reaches no later step."""
    silu = hidden_act == "silu"
    y = cached_causal_conv(
        x,
        conv1d,
        cache,
        layer_idx,
        padding_mask=padding_mask,
        document_starts=document_starts,
        activation="silu" if silu else None,
    )
    if not silu:
        y = act(y)
    if padding_mask is not None:
        y = y * padding_mask[..., None].to(y.dtype)
    return y


def _conv(x, weight, bias, tail, padding_mask, document_starts, keep_tail):
    """The conv, where pads (already zeroed) sit only before the first or after the last real token."""
    kernel, seq_len = weight.shape[-1], x.shape[1]
    if tail is None and document_starts is None and not keep_tail:  # training: one node, no padded copy
        taps = weight[:, 0, :].t().to(x.dtype)
        return _CausalConv.apply(x, taps, bias.to(x.dtype) if bias is not None else None), None
    if tail is None:
        padded = F.pad(x, (0, 0, kernel - 1, 0))
    else:
        padded = torch.cat([tail.transpose(1, 2).to(x.dtype), x], dim=1)
    doc = doc_padded = None
    if document_starts is not None and kernel > 1:
        doc = document_ids(document_starts)  # the document index of each token in its row
        doc_padded = F.pad(doc, (kernel - 1, 0))  # the old tail is in the row's first document
    taps = weight[:, 0, :].t().to(x.dtype)  # (kernel, channels)
    y = None if bias is None else bias.to(x.dtype)
    for k in range(kernel):
        term = padded[:, k : k + seq_len]  # tap k reads the input kernel - 1 - k tokens back
        if doc is not None and k < kernel - 1:
            term = term * (doc_padded[:, k : k + seq_len] == doc)[..., None].to(x.dtype)
        y = term * taps[k] if y is None else torch.addcmul(y, term, taps[k])
    if not keep_tail:
        return y, None
    width = kernel - 1
    if padding_mask is None and doc is None:
        return y, padded[:, padded.shape[1] - width :].transpose(1, 2)
    batch = x.shape[0]
    keep = torch.ones(batch, padded.shape[1], dtype=torch.bool, device=x.device)
    if padding_mask is not None:
        keep[:, width:] = padding_mask.bool()
    if doc is not None:
        keep = keep & (doc_padded == doc[:, -1:])
    return y, last_kept_inputs(padded, keep, width)


def _conv_over_real_tokens(x, weight, bias, tail, padding_mask, document_starts, keep_tail):
    """Interior pads: the window of a real token must reach the previous *real* tokens, as in the row without the
    pads. The real tokens are moved, in order, to the front of each row (a stable sort: no loop, no host sync),
    convolved there, and moved back; outputs at pads are zeros' convolution (ignored downstream)."""
    real = padding_mask.bool()
    order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices  # real tokens first, in order
    inverse = torch.argsort(order, dim=1)
    channels = x.shape[-1]
    compact = x.gather(1, order[..., None].expand(-1, -1, channels))
    starts = document_starts.gather(1, order) if document_starts is not None else None
    y, new_tail = _conv(compact, weight, bias, tail, real.gather(1, order), starts, keep_tail)
    return y.gather(1, inverse[..., None].expand(-1, -1, channels)), new_tail


def last_kept_inputs(seq: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """The last `width` entries of `seq` `(batch, time, channels)` where `keep` `(batch, time)` is True, in order,
    zeros in front when fewer are kept; returned as a conv tail `(batch, channels, width)`. A stable sort moves the
    kept entries to the end of each row: no loop, no host sync."""
    channels = seq.shape[-1]
    seq = seq * keep[..., None].to(seq.dtype)
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, seq.shape[1] - width :]
    return seq.gather(1, order[..., None].expand(-1, -1, channels)).transpose(1, 2)


class _CausalConv(torch.autograd.Function):
    """The causal depthwise conv from a zero start, ``y_t = bias + sum_j taps[K - 1 - j] * x_{t - j}``, as one
    autograd node: shifted slices of ``x`` itself (no zero-padded copy), and a hand-written backward
    (``dx_t = sum_j taps[K - 1 - j] dy_{t + j}``, ``dtaps`` one product-and-sum per tap in one reused buffer) instead
    of autograd's per-tap products and its zero-filled full-size gradient per shifted slice. x (B, T, C); taps (K, C).
    Measured fwd+bwd at (1, 2048, 768), K = 4, 1 thread: 12 ms vs 21 ms for the autograd version."""

    @staticmethod
    def forward(ctx, x, taps, bias):
        kernel, seq_len = taps.shape[0], x.shape[1]
        y = x * taps[kernel - 1]
        for j in range(1, min(kernel, seq_len)):  # tap K - 1 - j reads the input j tokens back
            y[:, j:].addcmul_(x[:, : seq_len - j], taps[kernel - 1 - j])
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, taps)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, taps = ctx.saved_tensors
        kernel, seq_len = taps.shape[0], dy.shape[1]
        dx = dy * taps[kernel - 1]
        batch, _, channels = dy.shape
        buf = torch.empty(dy.numel(), dtype=dy.dtype, device=dy.device)
        d_taps = torch.zeros_like(taps)
        for j in range(min(kernel, seq_len)):
            if j:
                dx[:, : seq_len - j].addcmul_(dy[:, j:], taps[kernel - 1 - j])
            prod = buf[: batch * (seq_len - j) * channels].view(batch, seq_len - j, channels)  # contiguous
            d_taps[kernel - 1 - j] = torch.mul(dy[:, j:], x[:, : seq_len - j], out=prod).sum((0, 1))
        return dx, d_taps, (dy.sum((0, 1)) if ctx.has_bias else None)
