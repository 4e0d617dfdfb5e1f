"""Dispatch of the gated delta rule to flash-linear-attention's (`fla`) Triton kernels on CUDA.

`delta_ops.gated_delta_rule` is the reference; when `fla` is installed, the tensors are on a CUDA device and the call
is causal (not bidirectional), the same computation runs in `fla.ops.gated_delta_rule.chunk_gated_delta_rule`
(prefill and training) or `fused_recurrent_gated_delta_rule` (the recurrent form without gradients: decoding; fla
gives that kernel no backward).

Conventions mapped here: fla's inputs are time-first `(B, T, H, D)` (ours head-first `(B, H, T, D)`), `g` and `beta`
are `(B, T, H)` (ours `(B, H, T)`), `g` is a natural-log decay like ours (DeltaNet's absent decay becomes `g = 0`),
`scale` multiplies `q` as ours does, states are `(B, H, K, V)` float32 like ours, and the caller has already
L2-normalised q and k (`use_qk_l2norm_in_kernel=False`). A document boundary, log decay `-inf`, is passed as
`_BOUNDARY_LOG_DECAY` (fla's chunk-local cumulative sums would turn `-inf - -inf` into NaN): a decay of `e^-80`
(about 1e-35) instead of exactly 0, far below float32 resolution of any real state.

`HF_EXTRAS_FLA=0` turns it off (read at each call, shared with `fla_dispatch`). This file is copied into saved
checkpoints: it imports `fla` only inside `try:`.
"""

import torch
from torch import Tensor

from .fla_dispatch import fla_enabled

DISPATCH_DEVICE_TYPES = ("cuda",)  # fla's kernels are Triton GPU kernels
_BOUNDARY_LOG_DECAY = -80.0
_KERNELS = {}


def _kernels():
    """`(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)` from fla, or `None` (looked up once)."""
    if "fla" not in _KERNELS:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        except Exception:  # not installed, too old, or no working Triton/GPU: fall back to the PyTorch forms
            _KERNELS["fla"] = None
        else:
            _KERNELS["fla"] = (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)
    return _KERNELS["fla"]


def fla_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor | None,
    *,
    mode: str,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    bidirectional: bool = False,
) -> tuple[Tensor, Tensor | None] | None:
    """fla's result for `gated_delta_rule` (same arguments, same return), or `None` when not dispatched: fla missing
    or disabled, tensors not on CUDA, or a bidirectional pass."""
    if bidirectional or q.device.type not in DISPATCH_DEVICE_TYPES or not fla_enabled():
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    chunk, fused_recurrent = kernels
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    B, H, T = beta.shape
    if log_decay is None:
        g = torch.zeros(B, T, H, device=q.device, dtype=torch.float32)
    else:
        g = log_decay.float().clamp(min=_BOUNDARY_LOG_DECAY).transpose(1, 2).contiguous()
    # fla's fused recurrent kernel has no backward: only for decoding without gradients
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, beta, log_decay, initial_state)
    )
    fn = fused_recurrent if mode == "recurrent" and not needs_grad else chunk
    o, final = fn(
        q.transpose(1, 2).to(dtype).contiguous(),
        k.transpose(1, 2).to(dtype).contiguous(),
        v.transpose(1, 2).to(dtype).contiguous(),
        g=g,
        beta=beta.transpose(1, 2).to(dtype).contiguous(),
        scale=scale,
        initial_state=initial_state.float() if initial_state is not None else None,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
    )
    return o.transpose(1, 2).to(v.dtype), (final.float() if final is not None else None)
