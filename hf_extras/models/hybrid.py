"""Layer schedules (hybrids): softmax attention blocks among a family's own linear mixers.

`config.layer_types` names each block: `"linear_attention"` is the family's mixer, `"full_attention"` and
`"sliding_attention"` are DyT's softmax self-attention (`attention.MultiHeadSelfAttention`: eager/SDPA through
transformers' attention interface, rotary positions, the KV cache), not a second implementation. This module holds
the schedule presets, the attention layer's rotary tables and the per-kind masks the backbone hands its blocks.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from .attention import MultiHeadSelfAttention
from .attention_masks import attention_document_mask_function, mask_with_cached_tokens
from .positions import rotary_cos_sin

HYBRID_ROPE_THETA = 10000.0


def hybrid_schedule(pattern: str, num_hidden_layers: int, sliding_window: int | None = None) -> list[str]:
    """A named layer schedule of `num_hidden_layers` blocks.

    - `"L:A"` (e.g. `"3:1"`, Qwen3-Next / Qwen3.5; `"7:1"`, Jamba-like): every `L+A` blocks, `L` linear then `A` full
      attention, so with `"3:1"` every 4th block is full attention.
    - `"L:A-sliding"` (e.g. `"3:1-sliding"`): the same with sliding-window attention layers (set `sliding_window`).
    - `"linear"`: all the family's own mixer (the default, `layer_types=None`).
    """
    if pattern == "linear":
        return ["linear_attention"] * num_hidden_layers
    kind = "full_attention"
    spec = pattern
    if pattern.endswith("-sliding"):
        kind, spec = "sliding_attention", pattern[: -len("-sliding")]
    try:
        linear, attention = (int(part) for part in spec.split(":"))
    except ValueError:
        raise ValueError(
            f'Unknown hybrid schedule {pattern!r}: use "L:A" (e.g. "3:1"), "L:A-sliding" or "linear".'
        ) from None
    if linear < 0 or attention < 1:
        raise ValueError(f"Hybrid schedule {pattern!r} needs at least one attention layer per period.")
    period = ["linear_attention"] * linear + [kind] * attention
    return [period[i % len(period)] for i in range(num_hidden_layers)]


def attention_head_dim(config) -> int:
    """Head dim of the hybrid attention layers (those of `MultiHeadSelfAttention`)."""
    return config.hidden_size // config.num_heads


class HybridAttention(MultiHeadSelfAttention):
    """A softmax attention block of a hybrid stack: DyT's self-attention; `sliding_window` set on sliding layers
    (read by transformers' attention backends), the masks come from `hybrid_masks`."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        kind = config.resolved_layer_types[layer_idx]
        self.sliding_window = config.sliding_window if kind == "sliding_attention" else None


def attention_rotary(config, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary `(cos, sin)` tables of the attention layers, once per forward (their head dim may differ from the
    family's own q/k width, and families without positions still need them here)."""
    theta = getattr(config, "rope_theta", HYBRID_ROPE_THETA)
    return rotary_cos_sin(position_ids, attention_head_dim(config), theta)


def hybrid_masks(config, padding_mask, inputs_embeds: torch.Tensor, cache, document_starts=None) -> dict:
    """The mask of each attention kind in the schedule, from the 2-D padding mask (past and new tokens, or new only)
    and the packed documents' boundaries (`document_starts`: block-diagonal, each document sees only itself).

    Built by transformers' masking utilities for the configured attention implementation: bidirectional for encoders
    (no causal part), causal for full layers, causal and windowed for sliding ones.
    """
    kinds = set(config.resolved_layer_types) - {"linear_attention"}
    padding_mask = mask_with_cached_tokens(padding_mask, cache, inputs_embeds.shape[1])
    same_document = attention_document_mask_function(document_starts, cache)
    masks = {}
    if config.bidirectional:
        mask = create_bidirectional_mask(
            config=config, inputs_embeds=inputs_embeds, attention_mask=padding_mask, and_mask_function=same_document
        )
        return dict.fromkeys(kinds, mask)
    arguments = dict(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=padding_mask,
        cache=cache,
        position_ids=None,  # the boundaries are ours (no second, syncing detection in the masking utilities)
        and_mask_function=same_document,
    )
    if "full_attention" in kinds:
        masks["full_attention"] = create_causal_mask(**arguments)
    if "sliding_attention" in kinds:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**arguments)
    return masks
