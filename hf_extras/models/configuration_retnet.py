"""RetNet configuration (`model_type="hfx_retnet"`)."""

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import positive_int_field

from .configuration_common import SequenceConfig, attention_window, positive


@strict
class RetNetConfig(SequenceConfig):
    r"""
    Retentive Network (Sun et al. 2023): multi-scale retention with a fixed decay per head,
    `gamma_h = 1 - 2^(-5-h)`, rotary positions on q/k, a per-head group norm and a swish output gate.
    Parallel, chunkwise and recurrent forms give the same numbers (`forward_mode`).

    Args (besides the shared ones in `SequenceConfig`):
        value_factor (`int`): value/gate width as a multiple of `hidden_size` (2 in the paper).
        rope_theta (`float`): rotary base.
        key_factor (`float`): q/k width as a multiple of `hidden_size` (1.0 in the paper; fla's `expand_k`); the
            q/k head dim `hidden_size * key_factor / num_heads` also sets the rotary dim and the `1/sqrt(d)` scale.
        use_output_gate (`bool`): multiply the normed retention output by `silu(g_proj(x))` (the paper's swish gate);
            `False` drops `g_proj` (fla's `use_output_gate=False`).
        attention_window (`int`, *optional*): also read the last `attention_window` tokens with exact softmax
            attention on the same q/k/v, added to the normed linear output (LoLCATs' window; linear cost, a bounded
            cache); `None` (default) is the plain linear mixer.

    Example:
        >>> from hf_extras import RetNetConfig, RetNetForCausalLM
        >>> model = RetNetForCausalLM(RetNetConfig(hidden_size=128, num_hidden_layers=2, num_heads=4))
    """

    model_type = "hfx_retnet"

    value_factor: int = positive_int_field(default=2)
    rope_theta: float = positive(10000.0)
    key_factor: float = positive(1.0)
    use_output_gate: bool = True
    attention_window: int | None = attention_window(default=None)

    @property
    def rotary_positions(self) -> bool:
        return True

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


__all__ = ["RetNetConfig"]
