"""Gated DeltaNet configuration (`model_type="hfx_gated_deltanet"`)."""

# No `from __future__ import annotations` in config files: @strict validates against the real types.
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import positive_int_field

from .configuration_common import SequenceConfig, attention_window, positive


@strict
class GatedDeltaNetConfig(SequenceConfig):
    r"""
    The delta rule: a memory that is corrected, not only decayed and added to,
    `S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T` (DeltaNet, Yang et al. 2024; Gated DeltaNet,
    Yang et al. 2025; the linear layers of Qwen3-Next).

    Args (besides the shared ones in `SequenceConfig`; `num_heads`, alias `num_value_heads`, counts the value
    heads, each with its own state):
        gate (`str`): `"head"` — Gated DeltaNet, one data-dependent decay per value head and token,
            `log a_t = -exp(A_log) * softplus(x_t W_a + dt_bias)`; `"none"` — plain DeltaNet (`a = 1`).
        num_key_heads (`int`, *optional*): query/key heads; each serves `num_heads / num_key_heads` consecutive
            value heads (grouped, as in Qwen3-Next). `None` means `num_heads`.
        key_head_dim (`int`, *optional*): width of a query/key head; `None` means `hidden_size / num_heads` (then
            `hidden_size` must be divisible by `num_heads`; with explicit widths it need not be, as in fla's
            2048-wide, 6-head models).
        value_head_dim (`int`, *optional*): width of a value head; `None` means `key_head_dim`.
        use_short_conv (`bool`), conv_size (`int`): the short causal depthwise conv (then SiLU) on q, k and v.
        silu_without_conv (`bool`): with `use_short_conv=False`, still apply SiLU to q, k and v (fla's
            `GatedDeltaNet` does); `False` (default) passes the projections on unchanged.
        use_output_gate (`bool`): the output passes a per-head RMS norm gated by `silu(x_t W_z)` (Qwen3-Next's
            `RMSNormGated`); `False` keeps the plain per-head RMS norm.
        output_gate_activation (`str`): the gate's activation, `"silu"` (Qwen3-Next, fla's default) or `"sigmoid"`
            (fla's `output_gate_activation="sigmoid"`).
        allow_neg_eigval (`bool`): `beta = 2 sigmoid(x W_b)` instead of `sigmoid(x W_b)`, so `I - beta k k^T` may
            have a negative eigenvalue (Grazzi et al. 2024, "Unlocking State-Tracking in Linear RNNs Through
            Negative Eigenvalues"; fla's `allow_neg_eigval`).
        chunk_size (`int`): as in every family, but 32 by default (faster for the delta rule on CPU).
        rope_theta (`float`): rotary base of the softmax attention layers of a hybrid schedule (`layer_types`) and
            of the mixers' softmax window (`attention_window`); the delta rule itself takes no positions.
        attention_window (`int`, *optional*): also read the last `attention_window` tokens with exact softmax
            attention (rotary positions on q/k before their L2 norm, `1/sqrt(key_head_dim)` scale; LoLCATs' window),
            added to the normed delta-rule output before its gate; linear cost, a bounded cache. `None` (default):
            the plain mixer.
    """

    model_type = "hfx_gated_deltanet"
    attribute_map = {"num_attention_heads": "num_heads", "num_value_heads": "num_heads"}

    gate: Literal["head", "none"] = "head"
    num_key_heads: int | None = None
    key_head_dim: int | None = None
    value_head_dim: int | None = None
    use_short_conv: bool = True
    conv_size: int = 4
    silu_without_conv: bool = False
    use_output_gate: bool = True
    output_gate_activation: Literal["silu", "sigmoid"] = "silu"
    allow_neg_eigval: bool = False
    # the delta rule's chunkwise form is fastest on CPU at 32-token chunks (its per-chunk triangular system grows
    # as C^2; benchmarks/delta_kernel.py: 1.9x / 3.7x transformers' kernel at 2k / 8k tokens vs 1.6x / 3.0x at 64)
    chunk_size: int = positive_int_field(default=32)
    rope_theta: float = positive(10000.0)
    attention_window: int | None = attention_window(default=None)

    def __post_init__(self, **kwargs):
        if self.num_key_heads is None:
            self.num_key_heads = self.num_heads
        if self.key_head_dim is None and self.hidden_size % self.num_heads == 0:
            self.key_head_dim = self.hidden_size // self.num_heads  # else left None: validation names the fields
        if self.value_head_dim is None:
            self.value_head_dim = self.key_head_dim
        super().__post_init__(**kwargs)

    @property
    def rotary_positions(self) -> bool:
        """Rotary tables for the softmax window only (the delta rule takes no positions)."""
        return self.attention_window is not None

    @property
    def head_dim(self) -> int:
        """The q/k head width, which the window's rotary tables cover."""
        return self.key_head_dim

    def validate_heads_divide_width(self):
        """Only the hybrid attention layers (`layer_types`) need `hidden_size / num_heads` whole: the delta-rule
        layers have their own `key_head_dim` / `value_head_dim`, unless they default to `hidden_size / num_heads`."""
        if self.is_hybrid:
            super().validate_heads_divide_width()
        elif self.key_head_dim is None:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_heads` ({self.num_heads}) when "
                "`key_head_dim` is None (it defaults to hidden_size / num_heads): set `key_head_dim` (and "
                "`value_head_dim`), or pick another head count."
            )

    def validate_delta_heads(self):
        """Head counts must group evenly; widths and the conv must be usable."""
        if self.num_key_heads <= 0 or self.num_heads % self.num_key_heads != 0:
            raise ValueError(
                f"`num_key_heads` ({self.num_key_heads}) must be a positive divisor of `num_heads` (the value heads, "
                f"{self.num_heads}): each key head serves num_heads / num_key_heads value heads."
            )
        for name in ("key_head_dim", "value_head_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(
                    f"`{name}` must be a positive integer (or None for the default), got {getattr(self, name)}."
                )
        if self.use_short_conv and self.conv_size < 2:
            raise ValueError(f"`conv_size` must be >= 2 when `use_short_conv=True`, got {self.conv_size}.")


__all__ = ["GatedDeltaNetConfig"]
