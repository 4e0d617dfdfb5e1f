"""Position encodings: rotary (RoPE) for q/k and the classic sinusoidal table.

Tables are computed on the fly from `position_ids` (cheap, and there is no buffer to re-initialise after
`from_pretrained`).
"""

from __future__ import annotations

import math

import torch


def rotary_cos_sin(
    position_ids: torch.Tensor, dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape `(batch, seq, dim)` for integer `position_ids` of shape `(batch, seq)`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` of shape `(batch, heads, seq, dim)` by tables of shape `(batch, seq, dim)` (cast to `x`'s dtype)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def sinusoidal_embedding(position_ids: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Transformer's fixed sinusoidal positions, `(batch, seq, dim)` (sin on even, cos on odd channels)."""
    half = (dim + 1) // 2
    div = torch.exp(
        torch.arange(half, device=position_ids.device, dtype=torch.float32) * (-math.log(10000.0) * 2 / dim)
    )
    angles = position_ids.to(torch.float32)[..., None] * div
    emb = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim]
    return emb.to(dtype)


def positions_from_mask(attention_mask: torch.Tensor | None, seq_len: int, past_len: int, device) -> torch.Tensor:
    """Position ids that count only real tokens, so a left-padded sequence gets the positions it has alone.

    `attention_mask` may cover the past and the new tokens (as `generate()` passes it) or the new tokens only.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0)
    pos = attention_mask.long().cumsum(-1) - 1
    missing = past_len + seq_len - attention_mask.shape[-1]  # mask given for the new tokens only
    if missing > 0:
        pos = pos + missing
    return pos[:, -seq_len:].clamp_min(0)
