"""Causal depthwise convolution over time with a cacheable tail (GLA's short q/k/v conv, Mamba's conv1d)."""

import torch
import torch.nn.functional as F


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convolve `x` `(batch, time, channels)` causally with a depthwise `weight` `(channels, 1, kernel)`
    (`nn.Conv1d`'s).

    `tail` holds the previous `kernel - 1` inputs `(batch, channels, kernel - 1)` (zeros at the start of a sequence),
    so a prefill followed by one-token steps gives the same outputs as one pass. Returns `(y, new_tail)`, `y` in the
    input's `(batch, time, channels)` layout.

    Written as `kernel` shifted multiply-adds in the channels-last layout: the same numbers as
    `F.conv1d(..., groups=channels)` (to float rounding), without two transposes and without the depthwise `conv1d`
    weight-gradient kernel, which is very slow on multi-threaded CPUs (measurements: benchmarks/results/NOTES.md).
    """
    kernel, seq_len = weight.shape[-1], x.shape[1]
    if tail is None:
        padded = F.pad(x, (0, 0, kernel - 1, 0))
    else:
        padded = torch.cat([tail.transpose(1, 2).to(x.dtype), x], dim=1)
    taps = weight[:, 0, :].t().to(x.dtype)  # (kernel, channels)
    y = padded[:, :seq_len] * taps[0] if bias is None else torch.addcmul(bias.to(x.dtype), padded[:, :seq_len], taps[0])
    for k in range(1, kernel):
        y = torch.addcmul(y, padded[:, k : k + seq_len], taps[k])
    return y, padded[:, padded.shape[1] - (kernel - 1) :].transpose(1, 2)


def conv_tail_of_real_tokens(
    x: torch.Tensor, mask: torch.Tensor, tail: torch.Tensor | None, kernel: int
) -> torch.Tensor:
    """The conv tail to cache after a padded chunk: the last `kernel - 1` inputs of *real* tokens.

    `x` `(batch, time, channels)`, `mask` `(batch, time)` (1 = real), `tail` `(batch, channels, kernel - 1)` or
    `None` (zeros: the start of the sequence, which counts as real). Returns `(batch, channels, kernel - 1)`, the
    layout of `causal_depthwise_conv`'s tails. Without this, a right- or interior-padded prefill would leave pads in
    the tail and the next decoded token would see zeros instead of the prompt's last tokens. A stable sort moves the
    real entries, in order, to the end of each row: no loop, no host sync.
    """
    batch, _, channels = x.shape
    width = kernel - 1
    prev = x.new_zeros(batch, width, channels) if tail is None else tail.transpose(1, 2).to(x.dtype)
    seq = torch.cat([prev, x], dim=1)
    real = torch.cat([mask.new_ones(batch, width), mask], dim=1).to(torch.int8)
    order = torch.sort(real, dim=1, stable=True).indices[:, seq.shape[1] - width :]
    return seq.gather(1, order[..., None].expand(-1, -1, channels)).transpose(1, 2)
