"""RetNet configuration (`model_type="hfx_retnet"`)."""

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import positive_int_field

from .configuration_common import SequenceConfig, positive


@strict
class RetNetConfig(SequenceConfig):
    r"""
    Retentive Network (Sun et al. 2023): multi-scale retention with a fixed decay per head,
    `gamma_h = 1 - 2^(-5-h)`, rotary positions on q/k, a per-head group norm and a swish output gate.
    Parallel, chunkwise and recurrent forms give the same numbers (`forward_mode`).

    Args (besides the shared ones in `SequenceConfig`):
        value_factor (`int`): value/gate width as a multiple of `hidden_size` (2 in the paper).
        rope_theta (`float`): rotary base.

    Example:
        >>> from hf_extras import RetNetConfig, RetNetForCausalLM
        >>> model = RetNetForCausalLM(RetNetConfig(hidden_size=128, num_hidden_layers=2, num_heads=4))
    """

    model_type = "hfx_retnet"

    value_factor: int = positive_int_field(default=2)
    rope_theta: float = positive(10000.0)

    @property
    def rotary_positions(self) -> bool:
        return True


__all__ = ["RetNetConfig"]
