"""DyT Transformer configuration (`model_type="hfx_dyt"`)."""

# No `from __future__ import annotations` in config files: @strict validates against the real (unstringified) types.
import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import positive_int_field

from .configuration_common import NormType, SequenceConfig, dropout, optional_positive, positive

PositionType = Literal["rotary", "sinusoidal", "learned"]
DytInit = Literal["constant", "paper_llm"]

# "Transformers without Normalization" (Zhu et al., CVPR 2025), Sec. 7 "Initialization of alpha" / appendix tables on
# LLaMA: for LLMs the best alpha_0 depends on the width (not on the depth), and the DyT in front of attention wants a
# larger alpha_0 than the others (before the FFN and the final one). (max width, attention alpha_0, other alpha_0):
# 4096 -> 0.8/0.2 (LLaMA 7B), 5120 -> 0.6/0.15 (13B), 8192 -> 0.2/0.05 (34B, 70B) are the published LLaMA 2 recipes
# (also the official repository's training configs); the two narrow rows are the paper's width sweep.
PAPER_LLM_ALPHA_TABLE: tuple[tuple[int, float, float], ...] = (
    (1024, 1.0, 1.0),
    (2048, 1.0, 0.5),
    (4096, 0.8, 0.2),
    (5120, 0.6, 0.15),
)
PAPER_LLM_ALPHA_WIDEST: tuple[float, float] = (0.2, 0.05)


def paper_llm_alphas(hidden_size: int) -> tuple[float, float]:
    """`(attention alpha_0, other alpha_0)` of the DyT paper's LLM recipe for a model of this width."""
    for max_width, attn, other in PAPER_LLM_ALPHA_TABLE:
        if hidden_size <= max_width:
            return attn, other
    return PAPER_LLM_ALPHA_WIDEST


@strict
class DyTConfig(SequenceConfig):
    r"""
    Transformer with Dynamic Tanh norms ("Transformers without Normalization", Zhu et al. 2025): pre-norm blocks
    `x = x + attention(norm(x)); x = x + ffn(norm(x))` with multi-head softmax self-attention (through transformers'
    attention interface: `attn_implementation="eager"` or `"sdpa"`), a KV cache (`DynamicCache`) for generation, and
    every norm a `DyT(x) = weight * tanh(alpha * x) + bias` (`norm_type="dyt"`, the default).

    With `norm_type="layernorm"`, `position_embedding_type="sinusoidal"`, `ffn_type="mlp"` and `hidden_act="relu"` it
    is the classic Transformer of "Attention Is All You Need" (in its pre-norm form, without biases), the baseline of the
    other families; `norm_type="rmsnorm"` with rotary positions and `ffn_type="glu"` is a LLaMA-style decoder.

    Args (besides the shared ones in `SequenceConfig`):
        position_embedding_type (`str`): `"rotary"` (RoPE on q/k), `"sinusoidal"` (the fixed sin/cos table added to
            the token embeddings) or `"learned"` (a trained table of `max_position_embeddings` rows, added).
        max_position_embeddings (`int`): rows of the learned table; longer inputs are refused. Informative otherwise.
        rope_theta (`float`): rotary base.
        attention_bias (`bool`): biases on the q/k/v/o projections.
        attention_dropout (`float`): dropout on the attention probabilities (training only).
        dyt_init (`str`): how DyT's `alpha` starts.
            `"constant"`: every DyT at `dyt_alpha_init` (0.5, the paper's default for non-LLM Transformers), except the
            DyT in front of attention at `dyt_attn_alpha_init` when that is set.
            `"paper_llm"`: the paper's LLM rule (Sec. 7 and its LLaMA tables): alpha_0 depends on the width and is
            larger in front of attention than elsewhere: width <= 1024: 1.0 / 1.0; <= 2048: 1.0 / 0.5;
            <= 4096: 0.8 / 0.2 (LLaMA 7B); <= 5120: 0.6 / 0.15 (13B); wider: 0.2 / 0.05 (34B, 70B)
            (attention / other). Building the config writes these values into `dyt_attn_alpha_init` and
            `dyt_alpha_init` (so the saved config shows them) and turns `embedding_scale` on unless it was set.
        dyt_attn_alpha_init (`float`, *optional*): initial alpha of the DyT in front of attention; `None` means
            `dyt_alpha_init`.
        embedding_scale (`bool`, *optional*): multiply the token embeddings by a learnable scalar initialised to
            `embedding_scale_init` (the paper's LLaMA setting adds one after the embedding layer, initialised to
            sqrt(hidden_size); the original Transformer multiplies by a fixed sqrt(d_model)). `None`: on for
            `norm_type="dyt"` and for `dyt_init="paper_llm"`, off otherwise. DyT needs it: embeddings start at std
            `initializer_range` (0.02), where `tanh(alpha * x)` is tiny and linear, and without the scale a small DyT
            LM barely learns (measurements: benchmarks/results/NOTES.md).
        embedding_scale_init (`float`, *optional*): initial value of that scalar; `None` means sqrt(hidden_size).
        prefix_lm (`bool`): a prefix LM (one stack for seq2seq): the causal LM takes a `prefix_mask` (1 on source
            tokens) and the source attends both ways while the target stays causal (the two masks joined).

    Example:
        >>> from hf_extras import DyTConfig, DyTForCausalLM
        >>> model = DyTForCausalLM(DyTConfig(hidden_size=128, num_hidden_layers=2, num_heads=4))
        >>> classic = DyTConfig(norm_type="layernorm", position_embedding_type="sinusoidal", ffn_type="mlp",
        ...                     hidden_act="relu")
    """

    model_type = "hfx_dyt"

    norm_type: NormType = "dyt"
    position_embedding_type: PositionType = "rotary"
    max_position_embeddings: int = positive_int_field(default=2048)
    rope_theta: float = positive(10000.0)
    attention_bias: bool = False
    attention_dropout: float = dropout()
    dyt_init: DytInit = "constant"
    dyt_attn_alpha_init: float | None = optional_positive(default=None)
    embedding_scale: bool | None = None
    embedding_scale_init: float | None = optional_positive(default=None)
    prefix_lm: bool = False

    def __post_init__(self, **kwargs):
        if self.dyt_init == "paper_llm" and isinstance(self.hidden_size, int):
            self.dyt_attn_alpha_init, self.dyt_alpha_init = paper_llm_alphas(self.hidden_size)
        if self.embedding_scale is None:
            self.embedding_scale = self.dyt_init == "paper_llm" or self.norm_type == "dyt"
        super().__post_init__(**kwargs)

    @property
    def layer_types(self) -> list[str]:
        # every layer keeps a growing KV cache (transformers' DynamicCache reads this)
        return ["full_attention"] * self.num_hidden_layers

    @layer_types.setter
    def layer_types(self, value) -> None:
        # DyT is softmax attention in every block already: no schedule to choose (a hybrid is another family's config
        # with "full_attention" entries); None or all "full_attention" (what it reports) are accepted for round trips
        if value is not None and any(kind != "full_attention" for kind in value):
            raise ValueError(
                f"DyTConfig has softmax attention in every block; `layer_types` cannot be {list(value)}. For a hybrid, "
                'give a recurrent family\'s config `layer_types` with "full_attention" entries.'
            )

    @property
    def resolved_layer_types(self) -> list[str]:
        return self.layer_types

    @property
    def is_hybrid(self) -> bool:
        return False  # every block is the family's own (attention) mixer

    @property
    def resolved_embedding_scale_init(self) -> float:
        return self.embedding_scale_init if self.embedding_scale_init is not None else math.sqrt(self.hidden_size)

    @property
    def rotary_positions(self) -> bool:
        return self.position_embedding_type == "rotary"

    def validate_prefix_lm_is_causal(self):
        """A prefix LM is causal over the target; only the source is seen both ways."""
        if self.prefix_lm and self.bidirectional:
            raise ValueError(
                "`prefix_lm=True` is causal over the target: build it with `bidirectional=False` (only the source "
                "marked by `prefix_mask` is seen both ways)."
            )


__all__ = ["DyTConfig", "paper_llm_alphas"]
