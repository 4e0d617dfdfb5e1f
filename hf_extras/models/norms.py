"""Normalisation layers: RMSNorm, LayerNorm and Dynamic Tanh (DyT), chosen by `norm_type`."""

from __future__ import annotations

import torch
from torch import nn

from .mixer_cpu_kernels import kernels_apply, rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm with a per-channel gain, computed in float32 for stability (a compiled kernel for float32
    on a CPU: `mixer_cpu_kernels.rms_norm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] and kernels_apply(x, self.weight):  # float32 on a CPU: one compiled pass each way
            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` under the project's constructor signature."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps)


class DyT(nn.Module):
    """Dynamic Tanh, `weight * tanh(alpha * x) + bias` ("Transformers without Normalization", Zhu et al. 2025).

    A drop-in replacement for a norm layer: one learnable scalar `alpha`, a per-channel `weight` (init
    `weight_init`, 1 as in the paper) and `bias` (init 0). No statistics are computed, so it is element-wise and
    fuses well.
    """

    def __init__(self, hidden_size: int | tuple[int, ...], alpha_init: float = 0.5, weight_init: float = 1.0):
        super().__init__()
        self.alpha_init = float(alpha_init)
        self.weight_init = float(weight_init)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(hidden_size) * self.weight_init)
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        extra = f", weight_init={self.weight_init:.4g}" if self.weight_init != 1.0 else ""
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}{extra}"


def build_norm(
    norm_type: str, hidden_size: int, eps: float = 1e-6, alpha_init: float = 0.5, dyt_weight_init: float = 1.0
) -> nn.Module:
    """The norm layer that `norm_type` names (`alpha_init` and `dyt_weight_init` apply to DyT only)."""
    if norm_type == "rmsnorm":
        return RMSNorm(hidden_size, eps)
    if norm_type == "layernorm":
        return LayerNorm(hidden_size, eps)
    if norm_type == "dyt":
        return DyT(hidden_size, alpha_init, dyt_weight_init)
    raise ValueError(f"`norm_type` must be 'rmsnorm', 'layernorm' or 'dyt', got {norm_type!r}.")
