"""Mamba-style selective state space configuration (`model_type="hfx_mamba"`)."""

# No `from __future__ import annotations` in config files: @strict validates against the real types.
import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import interval, positive_int_field

from .configuration_common import FfnType, SequenceConfig, positive


@strict
class HfxMambaConfig(SequenceConfig):
    r"""
    Mamba (Gu & Dao 2023): a selective state space (S6) token mixer with input-dependent `dt, B, C`, a causal
    depthwise conv and a gated output, in RMSNorm pre-norm blocks `x = x + mixer(norm(x))` (no FFN by default).
    The mixer's parameters have the names and shapes of transformers' `MambaMixer`, so a `MambaForCausalLM`
    checkpoint maps one to one (`hf_extras.convert.mamba`). transformers owns the `Mamba*` class names, hence `HfxMamba*`.

    Args (besides the shared ones in `SequenceConfig`; `MambaConfig`'s name in brackets where it differs):
        state_size (`int`): SSM state size `N` per channel.
        expand (`int`): the mixer's inner width is `expand * hidden_size` (`mixer_intermediate_size`; transformers
            calls it `intermediate_size`, which here stays the shared FFN width, unused with `ffn_type="none"`).
        conv_kernel (`int`): kernel of the causal depthwise conv.
        use_bias (`bool`): biases in `in_proj` / `out_proj`.
        use_conv_bias (`bool`): bias in the conv.
        time_step_rank (`int` or `"auto"`): rank of the `dt` projection; `"auto"` is `ceil(hidden_size / 16)`.
        time_step_scale, time_step_min, time_step_max, time_step_floor (`float`), time_step_init_scheme (`str`):
            initialisation of `dt_proj` exactly as in transformers (bias = softplus^-1 of a log-uniform `dt` in
            `[time_step_min, time_step_max]`; weight uniform (`"random"`) or constant with scale
            `time_step_rank^-0.5 * time_step_scale`).
        rescale_prenorm_residual (`bool`): divide `out_proj` by `sqrt(num_hidden_layers)` at initialisation.
        hidden_act (`str`): activation after the conv (and of the FFN, if any); the output gate is always SiLU.
        norm_eps (`float`) [`layer_norm_epsilon`], residual_in_fp32 (`bool`): as in transformers (defaults 1e-5, True).
        forward_mode (`str`): `"chunkwise"` (loop over chunks, log-depth parallel scan inside, memory-bounded
            backward), `"parallel"` (log-depth scan over the whole sequence under autograd), `"recurrent"` (token by
            token), or `"auto"` (recurrent for one-token decoding steps; otherwise the fused C kernel of
            `scan_cpu_kernel` for float32 on a CPU, compiled on first use, and chunkwise where it does not apply or
            `HF_EXTRAS_CPU_KERNEL=0`).
        chunk_size (`int`): chunk length of the chunkwise scan (64 by default; see the measurements in `scan_ops`).
        num_heads (`int`): not used by the Mamba mixer (it has no heads); kept valid for the shared fields, 1 by default.
        bidirectional (`bool`): for encoders (masked LM, classification, QA): a causal and an anti-causal scan with
            the same parameters, summed (the current token counted once); the conv stays causal.

    Example:
        >>> from hf_extras import HfxMambaConfig, HfxMambaForCausalLM
        >>> model = HfxMambaForCausalLM(HfxMambaConfig(hidden_size=128, num_hidden_layers=2))
    """

    model_type = "hfx_mamba"

    num_heads: int = 1
    ffn_type: FfnType = "none"
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    state_size: int = positive_int_field(default=16)
    expand: int = positive_int_field(default=2)
    conv_kernel: int = positive_int_field(default=4)
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_rank: int | Literal["auto"] = "auto"
    time_step_scale: float = positive(1.0)
    time_step_min: float = positive(0.001)
    time_step_max: float = positive(0.1)
    time_step_init_scheme: Literal["random", "constant"] = "random"
    time_step_floor: float = interval(min=0.0)(default=1e-4)
    rescale_prenorm_residual: bool = False

    def __post_init__(self, **kwargs):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        super().__post_init__(**kwargs)

    @property
    def mixer_intermediate_size(self) -> int:
        """Inner width of the mixer (`MambaConfig.intermediate_size`)."""
        return self.expand * self.hidden_size

    def validate_time_step_range(self):
        """`dt` is initialised log-uniform in `[time_step_min, time_step_max]`; its projection rank is positive."""
        if self.time_step_min > self.time_step_max:
            raise ValueError(
                f"`time_step_min` ({self.time_step_min}) and `time_step_max` ({self.time_step_max}) must satisfy "
                "0 < time_step_min <= time_step_max."
            )
        if self.time_step_rank <= 0:  # an int by now: __post_init__ resolved "auto"
            raise ValueError(f"`time_step_rank` must be a positive integer or 'auto', got {self.time_step_rank!r}.")


__all__ = ["HfxMambaConfig"]
