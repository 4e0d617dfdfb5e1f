"""Causal depthwise convolution over time with a cacheable tail (GLA's short q/k/v conv, Mamba's conv1d)."""

import torch
import torch.nn.functional as F


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convolve `x` `(batch, channels, time)` causally with a depthwise `weight` `(channels, 1, kernel)`.

    `tail` holds the previous `kernel - 1` inputs (zeros at the start of a sequence), so a prefill followed by
    one-token steps gives the same outputs as one pass. Returns `(y, new_tail)`.
    """
    kernel = weight.shape[-1]
    if tail is None:
        padded = F.pad(x, (kernel - 1, 0))
    else:
        padded = torch.cat([tail.to(x.dtype), x], dim=-1)
    y = F.conv1d(padded, weight, bias, groups=x.shape[1])
    return y, padded[..., padded.shape[-1] - (kernel - 1) :]
