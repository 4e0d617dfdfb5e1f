"""RetNet configuration (`model_type="hfx_retnet"`)."""

from huggingface_hub.dataclasses import strict

from .configuration_common import HfxSequenceConfig


@strict
class RetNetConfig(HfxSequenceConfig):
    r"""
    Retentive Network (Sun et al. 2023): multi-scale retention with a fixed decay per head,
    `gamma_h = 1 - 2^(-5-h)`, rotary positions on q/k, a per-head group norm and a swish output gate.
    Parallel, chunkwise and recurrent forms give the same numbers (`forward_mode`).

    Args (besides the shared ones in `HfxSequenceConfig`):
        value_factor (`int`): value/gate width as a multiple of `hidden_size` (2 in the paper).
        rope_theta (`float`): rotary base.

    Example:
        >>> from hf_extras import RetNetConfig, RetNetForCausalLM
        >>> model = RetNetForCausalLM(RetNetConfig(hidden_size=128, num_hidden_layers=2, num_heads=4))
    """

    model_type = "hfx_retnet"

    value_factor: int = 2
    rope_theta: float = 10000.0

    def validate_retention(self):
        """Rotary needs an even head dim; the value width must be positive."""
        if self.value_factor <= 0:
            raise ValueError(f"`value_factor` must be a positive integer, got {self.value_factor}.")
        if (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError(
                f"`hidden_size / num_heads` ({self.hidden_size}/{self.num_heads}) must be even for rotary positions."
            )
        if self.rope_theta <= 0:
            raise ValueError(f"`rope_theta` must be > 0, got {self.rope_theta}.")


__all__ = ["RetNetConfig"]
