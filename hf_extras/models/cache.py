"""The fixed-size recurrent cache of the retention and state-space families, built on transformers' cache classes.

A hybrid schedule (`config.layer_types`) mixes in transformers' key/value layers for its softmax attention blocks
(`DynamicLayer`, or `DynamicSlidingWindowLayer` bounded by `sliding_window`): one cache, one layer per block.

A layer's state does not grow with context: one `(heads, d_k, d_v)` matrix per layer for retention, conv and SSM
states for Mamba. transformers' all-linear `DynamicCache` cannot report a sequence length (it raises in
`get_seq_length()`, which prefill, user-supplied caches and PEFT prompt tuning call), and its getters return `None`
until a conv state was written; this subclass counts the tokens it has seen and reads and writes states directly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionLayer,
)

WINDOW_STATES = (1, 2, 3)  # a linear layer's state slots for its window tail: keys, values, valid


def cache_layer(kind: str, sliding_window: int | None = None, attention_window: int | None = None):
    """transformers' cache layer for one block of a (hybrid) schedule: a fixed-size state for `"linear_attention"`
    (with slots for the tail of its softmax window when `attention_window` is set), a growing key/value cache for
    `"full_attention"`, one bounded by the window for `"sliding_attention"`."""
    if kind == "linear_attention":
        return LinearAttentionLayer(number_of_states=1 + len(WINDOW_STATES) if attention_window else 1)
    if kind == "full_attention":
        return DynamicLayer()
    if kind == "sliding_attention":
        return DynamicSlidingWindowLayer(sliding_window=sliding_window)
    raise ValueError(f"Unknown layer kind {kind!r} in `layer_types`.")


class RecurrentCache(DynamicCache):
    """`DynamicCache` of `LinearAttentionLayer`s that also counts the tokens it has absorbed.

    Beam search reorders every state through the layers' own `reorder_cache`.
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if config is not None:
            kinds = getattr(config, "resolved_layer_types", None) or ["linear_attention"] * config.num_hidden_layers
            windows = (getattr(config, "sliding_window", None), getattr(config, "attention_window", None))
            layers = [cache_layer(kind, *windows) for kind in kinds]
        else:
            if num_layers is None:
                raise ValueError("RecurrentCache needs `config` or `num_layers`.")
            layers = [LinearAttentionLayer() for _ in range(num_layers)]
        Cache.__init__(self, layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def advance(self, num_tokens: int) -> None:
        """Record that `num_tokens` more tokens went through every layer."""
        self.seen_tokens += num_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A recurrent state cannot be rolled back to an earlier position; recompute from the prompt instead."
        )

    def read_recurrent(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The layer's recurrent state, or `None` before the first write."""
        layer = self.layers[layer_idx]
        return layer.recurrent_states[state_idx] if layer.is_recurrent_states_initialized[state_idx] else None

    def write_recurrent(self, layer_idx: int, state: torch.Tensor, state_idx: int = 0) -> None:
        layer = self.layers[layer_idx]
        layer.update_recurrent_state(state, state_idx)
        layer.has_previous_state[state_idx] = True

    def read_conv(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The last `kernel_size` conv inputs `(batch, channels, kernel)`, or `None` before the first write."""
        layer = self.layers[layer_idx]
        return layer.conv_states[state_idx] if layer.is_conv_states_initialized[state_idx] else None

    def write_conv(self, layer_idx: int, conv_input: torch.Tensor, kernel_size: int, state_idx: int = 0) -> None:
        """Keep the last `kernel_size` columns of `conv_input` `(batch, channels, time)` (left-padded with zeros)."""
        layer = self.layers[layer_idx]
        if conv_input.shape[-1] < kernel_size:
            conv_input = torch.nn.functional.pad(conv_input, (kernel_size - conv_input.shape[-1], 0))
        tail = conv_input[..., -kernel_size:]
        if not layer.is_conv_states_initialized[state_idx]:
            layer.lazy_initialization(conv_states=tail, state_idx=state_idx, conv_kernel_size=kernel_size)
        layer.conv_states[state_idx].copy_(tail)
        layer.has_previous_state[state_idx] = True

    def read_window(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The tail of a linear layer's softmax window `(keys, values, valid)`, or `None` before the first write."""
        layer = self.layers[layer_idx]
        if not layer.is_recurrent_states_initialized[WINDOW_STATES[0]]:
            return None
        keys, values, valid = (layer.recurrent_states[i] for i in WINDOW_STATES)
        return keys, values, valid

    def write_window(self, layer_idx: int, tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        layer = self.layers[layer_idx]
        for i, part in zip(WINDOW_STATES, tail):
            layer.update_recurrent_state(part, i)


def as_recurrent_cache(cache, config, use_cache: bool) -> RecurrentCache | None:
    """The cache a recurrent model works with: the given one, a new one when `use_cache`, else `None`."""
    if cache is None:
        return RecurrentCache(config=config) if use_cache else None
    if not isinstance(cache, RecurrentCache):
        raise TypeError(
            f"This model keeps a fixed-size recurrent state and needs a `RecurrentCache`, got {type(cache).__name__}. "
            "Pass `cache=None` (one is created) or `RecurrentCache(config=model.config)`."
        )
    return cache
