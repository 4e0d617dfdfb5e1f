"""Mamba-2 (state-space duality) configuration (`model_type="hfx_mamba2"`)."""

# No `from __future__ import annotations` in config files: @strict validates against the real types.
import math

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import interval, positive_int_field

from .configuration_common import FfnType, SequenceConfig, positive


@strict
class HfxMamba2Config(SequenceConfig):
    r"""
    Mamba-2 (Dao & Gu 2024): the selective SSM with one scalar decay per head, `h_t = exp(dt_t A_h) h_{t-1} +
    dt_t B_t x_t^T`, `y_t = C_t h_t + D x_t`. By state-space duality that is decayed linear attention with `q = C`,
    `k = dt * B`, `v = x` and a per-head log decay `dt * A`, so it runs on `retention_ops` (parallel, chunkwise,
    recurrent, bidirectional). Blocks are `x = x + mixer(norm(x))` (no FFN by default). The mixer's parameters have
    the names and shapes of transformers' `Mamba2Mixer`, so a `Mamba2ForCausalLM` checkpoint maps one to one
    (`hf_extras.convert.mamba2`). transformers owns the `Mamba2*` class names, hence `HfxMamba2*`.

    Args (besides the shared ones in `SequenceConfig`; `Mamba2Config`'s name in brackets where it differs):
        num_heads (`int`): SSM heads; each has its own decay `A_h` and `head_dim = expand * hidden_size / num_heads`
            value channels (`Mamba2Config.head_dim` is derived, not a field).
        state_size (`int`): SSM state size `N` (the key width of the linear attention).
        n_groups (`int`): groups of heads sharing `B` and `C` (like grouped-query attention); must divide
            `num_heads`. The gated output norm normalises each group's `expand * hidden_size / n_groups` channels.
        expand (`int`): the mixer's inner width is `expand * hidden_size` (`mixer_intermediate_size`;
            transformers derives it the same way; the shared `intermediate_size` stays the FFN width).
        conv_kernel (`int`): kernel of the causal depthwise conv over `x, B, C`.
        use_bias (`bool`): biases in `in_proj` / `out_proj`.
        use_conv_bias (`bool`): bias in the conv.
        time_step_min, time_step_max, time_step_floor (`float`): initialisation of `dt_bias` exactly as in
            transformers (softplus^-1 of a log-uniform `dt` in `[time_step_min, time_step_max]`, floored).
        time_step_limit (`list[float]`): `dt` is clamped to `[low, high]` after the softplus (`(0, inf)`: no clamp).
        rescale_prenorm_residual (`bool`): divide `out_proj` by `sqrt(num_hidden_layers)` at initialisation.
        hidden_act (`str`): activation after the conv (and of the FFN, if any); the output gate is always SiLU.
        D_has_hdim (`bool`): the skip `D` has one value per channel (`expand * hidden_size`) instead of one per head
            (mamba_ssm's and fla's `D_has_hdim`).
        output_norm (`bool`): the gated RMS norm on the scan output; `False` gives `y * silu(z)` with no norm (and no
            `norm.weight`; mamba_ssm's and fla's `rmsnorm=False`).
        norm_before_gate (`bool`): `norm(y) * silu(z)` instead of transformers' `norm(y * silu(z))` (mamba_ssm's and
            fla's `norm_before_gate=True`).
        norm_eps (`float`) [`layer_norm_epsilon`], residual_in_fp32 (`bool`): as in transformers (defaults 1e-5, True).
        forward_mode (`str`): `"parallel"`, `"chunkwise"`, `"recurrent"` or `"auto"` (recurrent for decoding steps,
            parallel for short inputs, chunkwise beyond; see `retention_ops.pick_mode`).
        chunk_size (`int`): chunk length of the chunkwise form (transformers' default is 256, tuned for its CUDA
            kernels; 64 is faster for the PyTorch form on CPU).
        bidirectional (`bool`): for encoders (masked LM, classification, QA): the causal and the anti-causal scan with
            the same parameters, summed (the current token counted once); the conv stays causal.

    Example:
        >>> from hf_extras import HfxMamba2Config, HfxMamba2ForCausalLM
        >>> model = HfxMamba2ForCausalLM(HfxMamba2Config(hidden_size=128, num_hidden_layers=2, num_heads=4))
    """

    model_type = "hfx_mamba2"

    num_heads: int = positive_int_field(default=8)
    ffn_type: FfnType = "none"
    norm_eps: float = positive(1e-5)
    residual_in_fp32: bool = True
    state_size: int = positive_int_field(default=128)
    n_groups: int = positive_int_field(default=1)
    expand: int = positive_int_field(default=2)
    conv_kernel: int = positive_int_field(default=4)
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_min: float = positive(0.001)
    time_step_max: float = positive(0.1)
    time_step_floor: float = interval(min=0.0)(default=1e-4)
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    rescale_prenorm_residual: bool = False
    D_has_hdim: bool = False
    output_norm: bool = True
    norm_before_gate: bool = False

    @property
    def mixer_intermediate_size(self) -> int:
        """Inner width of the mixer (`expand * hidden_size`)."""
        return self.expand * self.hidden_size

    @property
    def head_dim(self) -> int:
        """Value channels per SSM head (`Mamba2Config.head_dim`)."""
        return self.mixer_intermediate_size // self.num_heads

    def validate_heads_and_groups(self):
        """Heads split the mixer width; groups split the heads."""
        if self.mixer_intermediate_size % self.num_heads != 0:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must divide the mixer width expand * hidden_size "
                f"({self.expand} * {self.hidden_size} = {self.mixer_intermediate_size}): each head gets "
                "`head_dim = expand * hidden_size / num_heads` channels."
            )
        if self.num_heads % self.n_groups != 0:
            raise ValueError(
                f"`n_groups` ({self.n_groups}) must divide `num_heads` ({self.num_heads}): each B/C group is shared "
                "by num_heads / n_groups heads."
            )

    def validate_time_step_range(self):
        """`dt_bias` is initialised from `[time_step_min, time_step_max]`; `dt` is clamped to `time_step_limit`."""
        if self.time_step_min > self.time_step_max:
            raise ValueError(
                f"`time_step_min` ({self.time_step_min}) and `time_step_max` ({self.time_step_max}) must satisfy "
                "0 < time_step_min <= time_step_max."
            )
        limit = tuple(self.time_step_limit)
        if len(limit) != 2 or not (0.0 <= limit[0] < limit[1]) or math.isnan(limit[1]):
            raise ValueError(
                f"`time_step_limit` must be two numbers [low, high] with 0 <= low < high (use [0.0, inf] for no "
                f"clamp), got {self.time_step_limit!r}."
            )


__all__ = ["HfxMamba2Config"]
