"""Dispatch of decayed linear attention to flash-linear-attention's (`fla`) Triton kernels on CUDA.

`retention_ops.decayed_linear_attention` is the reference; when `fla` is installed, the tensors are on a CUDA
device and the call is a causal (not bidirectional) multi-token pass, the same computation runs in fla's chunked
kernels instead:

* no decay or a fixed per-head decay `(H,)` -> `fla.ops.simple_gla.chunk_simple_gla` (`g=None` / `g_gamma`),
* a data-dependent per-head decay `(B, H, T)` -> `chunk_simple_gla(g=...)`,
* a per-key-channel decay `(B, H, T, Dk)` -> `fla.ops.gla.chunk_gla`.

Conventions mapped here: fla's inputs are time-first `(B, T, H, D)` (ours are head-first `(B, H, T, D)`), its gates
are natural-log decays like ours, its `scale` multiplies `q` (ours is applied by the caller, so `scale=1`), and its
states are `(B, H, Dk, Dv)` float32 like ours; the output `o_t = q_t S_t` includes token t in both.

Turn it off with the environment variable `HF_EXTRAS_FLA=0` (read at each call). This file is copied into saved
checkpoints: it imports `fla` only inside `try:` (a machine without it loads the model and uses the PyTorch forms).
"""

import inspect
import os

import torch
from torch import Tensor

DISPATCH_DEVICE_TYPES = ("cuda",)  # fla's kernels are Triton GPU kernels
_KERNELS = {}


def fla_enabled() -> bool:
    """Whether dispatch is allowed (`HF_EXTRAS_FLA` unset, or anything but 0/false/no/off)."""
    return os.environ.get("HF_EXTRAS_FLA", "1").strip().lower() not in ("0", "false", "no", "off")


def _kernels():
    """`(chunk_simple_gla, chunk_gla)` from fla, or `None` when it is not installed (looked up once)."""
    if "fla" not in _KERNELS:
        try:
            from fla.ops.gla import chunk_gla
            from fla.ops.simple_gla import chunk_simple_gla
        except Exception:  # not installed, or no working Triton/GPU: fall back to the PyTorch forms
            _KERNELS["fla"] = None
        else:
            _KERNELS["fla"] = (chunk_simple_gla, chunk_gla)
    return _KERNELS["fla"]


def fla_available(device: torch.device) -> bool:
    """Whether `fla_decayed_linear_attention` may run fla's kernels for tensors on `device` (dispatch enabled, the
    device one of `DISPATCH_DEVICE_TYPES`, fla installed): callers that build fla's per-head inputs specially (Mamba-2's
    grouped B/C) ask first, so CPU runs never build them."""
    return device.type in DISPATCH_DEVICE_TYPES and fla_enabled() and _kernels() is not None


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _time_first(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.transpose(1, 2).to(dtype).contiguous()


def fla_decayed_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None,
    *,
    mode: str,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    bidirectional: bool = False,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None] | None:
    """fla's result for `decayed_linear_attention` (same arguments, same return), or `None` when not dispatched:
    fla missing or disabled, tensors not on CUDA, a bidirectional pass or a recurrent (decoding) step.

    Packed documents (`reset`) go through fla's variable-length path: the rows are laid end to end as one sequence
    and every document (and every row) becomes one of fla's `cu_seqlens` sequences, each starting from a zero state
    (a row's first document from the row's `initial_state`); the returned state of a row is that of its last
    document. Finding the starts reads the mask back (fla's varlen kernels read `cu_seqlens` on the host too)."""
    if bidirectional or mode == "recurrent":
        return None
    if q.device.type not in DISPATCH_DEVICE_TYPES or not fla_enabled():
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    chunk_simple_gla, chunk_gla = kernels
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    args = [_time_first(q, dtype), _time_first(k, dtype), _time_first(v, dtype)]
    state = initial_state.float() if initial_state is not None else None
    kwargs = dict(scale=1.0, initial_state=state, output_final_state=output_final_state)
    if log_decay is not None and log_decay.dim() == 4:  # per key channel (GLA)
        fn = chunk_gla
        kwargs["g"] = log_decay.transpose(1, 2).float().contiguous()
    else:
        fn = chunk_simple_gla
        if log_decay is None:
            kwargs["g"] = None
        elif log_decay.dim() == 3:  # (B, H, T) per head and token
            kwargs["g"] = log_decay.transpose(1, 2).float().contiguous()
        elif _accepts(fn, "g_gamma"):  # fixed (H,)
            kwargs["g_gamma"] = log_decay.float()
        else:  # older fla: the fixed decay as a per-token gate
            B, T = q.shape[0], q.shape[2]
            kwargs["g"] = log_decay.float().view(1, 1, -1).expand(B, T, -1).contiguous()
    if _accepts(fn, "head_first"):  # fla < 0.2 defaulted to head-first; newer versions reject the argument
        kwargs["head_first"] = False
    if reset is None:
        o, final = fn(*args, **kwargs)
        return o.transpose(1, 2).to(v.dtype), (final.float() if final is not None else None)
    B, T = reset.shape
    cu_seqlens, first, last = varlen_sequences(reset)
    args = [x.reshape(1, B * T, *x.shape[2:]) for x in args]
    if kwargs.get("g") is not None:
        kwargs["g"] = kwargs["g"].reshape(1, B * T, *kwargs["g"].shape[2:])
    if state is not None:  # one state per sequence: the row's for its first document, zeros for the others
        seeded = state.new_zeros(cu_seqlens.numel() - 1, *state.shape[1:])
        kwargs["initial_state"] = seeded.index_copy(0, first, state)
    o, final = fn(*args, cu_seqlens=cu_seqlens, **kwargs)
    o = o.reshape(B, T, *o.shape[2:])
    return o.transpose(1, 2).to(v.dtype), (final[last].float() if final is not None else None)


def varlen_sequences(reset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fla's `cu_seqlens` for `(B, T)` rows laid end to end, each document (True in `reset`) and each row a sequence;
    also the index of each row's first and last sequence. One host sync (the number of sequences)."""
    B, T = reset.shape
    starts = reset.clone()
    starts[:, 0] = True
    per_row = starts.sum(dim=1)
    last = torch.cumsum(per_row, 0) - 1
    first = last - per_row + 1
    positions = torch.nonzero(starts.reshape(-1)).squeeze(1)
    end = torch.full((1,), B * T, dtype=positions.dtype, device=positions.device)
    return torch.cat([positions, end]), first, last
