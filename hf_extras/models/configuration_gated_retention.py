"""Gated retention configuration (`model_type="hfx_gated_retention"`)."""

# No `from __future__ import annotations` in config files: @strict validates against the real types.
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import positive_int_field

from .configuration_common import SequenceConfig, attention_window, positive


@strict
class GatedRetentionConfig(SequenceConfig):
    r"""
    Retention whose forgetting is data-dependent: the step from linear attention to retention to gated retention.

    Args (besides the shared ones in `SequenceConfig`):
        gate (`str`): `"key"` — one decay per key channel from a low-rank projection,
            `alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau)` (GLA, Yang et al. 2023); `"head"` — one scalar decay per head
            and token, `gamma_t = sigmoid(x_t W_gamma + b)^(1/tau)` (gated retention as in YOCO); `"none"` — plain
            linear attention, no forgetting.
        gate_logit_normalizer (`float`): `tau`, which keeps decays near 1 at initialisation (16 as in GLA).
        gate_low_rank_dim (`int`): rank of the per-key gate projection (16 as in GLA).
        feature_map (`str`): applied to q and k: `"identity"`, `"elu"` (elu+1) or `"relu"`.
        use_short_conv (`bool`), conv_size (`int`): a short causal depthwise conv (then SiLU) on q, k and v.
        value_factor (`int`): value/gate width as a multiple of `hidden_size`.
        use_rotary (`bool`), rope_theta (`float`): rotary positions on q/k (the gates already encode order).
        key_factor (`float`): q/k (and per-key gate) width as a multiple of `hidden_size` (fla's `expand_k`, 0.5 in
            GLA); the q/k head dim `hidden_size * key_factor / num_heads` also sets the `1/sqrt(d)` scale.
        use_output_gate (`bool`): multiply the normed output by `silu(g_proj(x))`; `False` drops `g_proj`.
        gate_clamp_min (`float`, *optional*): lower bound on every log decay `log a_t` (fla GLA's `clamp_min`);
            `None` leaves them unbounded.
        attention_window (`int`, *optional*): also read the last `attention_window` tokens with exact softmax
            attention on the same q/k/v, added to the normed linear output (LoLCATs' window; linear cost, a bounded
            cache); `None` (default) is the plain linear mixer.
    """

    model_type = "hfx_gated_retention"

    gate: Literal["key", "head", "none"] = "key"
    gate_logit_normalizer: float = positive(16.0)
    gate_low_rank_dim: int = positive_int_field(default=16)
    feature_map: Literal["identity", "elu", "relu"] = "identity"
    use_short_conv: bool = False
    conv_size: int = 4
    value_factor: int = positive_int_field(default=1)
    use_rotary: bool = False
    rope_theta: float = positive(10000.0)
    key_factor: float = positive(1.0)
    use_output_gate: bool = True
    gate_clamp_min: float | None = None
    attention_window: int | None = attention_window(default=None)

    @property
    def rotary_positions(self) -> bool:
        return self.use_rotary

    @property
    def head_dim(self) -> int:
        """The q/k head dim (also the rotary dim): `hidden_size * key_factor / num_heads`."""
        return round(self.hidden_size * self.key_factor) // self.num_heads

    def validate_key_width(self):
        """`hidden_size * key_factor` must be a whole number of channels that splits evenly into heads."""
        width = self.hidden_size * self.key_factor
        if abs(width - round(width)) > 1e-6 or round(width) % self.num_heads != 0 or round(width) < self.num_heads:
            raise ValueError(
                f"`hidden_size * key_factor` ({self.hidden_size} * {self.key_factor}) must be a whole multiple of "
                f"`num_heads` ({self.num_heads}): pick a key_factor such as 0.5 or 1.0 that gives one."
            )

    def validate_gate_clamp(self):
        """A clamp on log decays must be negative (a log decay is <= 0)."""
        if self.gate_clamp_min is not None and not self.gate_clamp_min < 0:
            raise ValueError(
                f"`gate_clamp_min` must be < 0 (a bound on log decays) or None, got {self.gate_clamp_min}."
            )

    def validate_short_conv_size(self):
        """A short conv needs at least two taps."""
        if self.use_short_conv and self.conv_size < 2:
            raise ValueError(f"`conv_size` must be >= 2 when `use_short_conv=True`, got {self.conv_size}.")


__all__ = ["GatedRetentionConfig"]
