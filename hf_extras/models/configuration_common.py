"""Fields and rules shared by every hf_extras family.

`CommonConfig` holds what every family has (MLP-Mixer included): sizes, norms, dropout, pooling, token ids.
`SequenceConfig` adds what the sequence families share (heads, FFN, kernels, seq2seq); each family's config subclasses
one of them and adds its own fields. Configs are transformers 5 `@strict` dataclasses: plain ranges are field
validators (`interval`, `positive_int_field`), cross-field rules are `validate_*` methods named after what they check,
so a bad value fails when the config is built, with a message that names the field.
"""

# No `from __future__ import annotations` in config files: @strict validates against the real (unstringified) types.
import copy
import math
from typing import Literal

from huggingface_hub.dataclasses import as_validated_field, strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils.type_validators import interval, positive_int_field

NormType = Literal["rmsnorm", "layernorm", "dyt"]
FfnType = Literal["mlp", "glu", "moe", "none"]
ForwardMode = Literal["auto", "parallel", "chunkwise", "recurrent"]
Pooling = Literal["auto", "last", "mean", "first"]
# the layer kinds a sequence family's stack may mix, in transformers' `layer_types` vocabulary
SEQUENCE_LAYER_TYPES = ("linear_attention", "full_attention", "sliding_attention")


@as_validated_field
def optional_positive(value: float | None):
    """`None` (a value derived from other fields) or a number > 0."""
    if value is not None and not value > 0:
        raise ValueError(f"Value must be > 0 (or None for the derived default), got {value}.")


@as_validated_field
def attention_window(value: int | None):
    """`None` (no softmax window in the linear mixer) or a window of at least 2 tokens (itself and one before)."""
    if value is not None and value < 2:  # the field's type (int | None) is checked by @strict already
        raise ValueError(
            f"`attention_window` must be None (off) or an int >= 2 (the token and those before it), got {value!r}."
        )


def positive(default: float):
    """A float field that must be > 0 (epsilons, bases, temperatures)."""
    return interval(min=0.0, exclude_min=True)(default=default)


def dropout(default: float = 0.0):
    """A dropout probability in [0, 1)."""
    return interval(min=0.0, max=1.0, exclude_max=True)(default=default)


def check_hidden_act(hidden_act: str) -> None:
    """`hidden_act` must name one of transformers' activations (`ACT2FN`), checked when the config is built."""
    if hidden_act not in ACT2FN:
        raise ValueError(
            f"`hidden_act` {hidden_act!r} is not an activation transformers knows: use one of "
            f"{', '.join(sorted(ACT2FN))}."
        )


@strict
class CommonConfig(PreTrainedConfig):
    r"""
    Fields every hf_extras family shares, with the same names and meanings (MLP-Mixer included).

    Args:
        vocab_size (`int`): vocabulary size; the embedded byte tokenizer needs 263 (264 keeps it a multiple of 8).
        hidden_size (`int`): width of the residual stream.
        num_hidden_layers (`int`): number of blocks.
        hidden_act (`str`): FFN activation (any key of `transformers.activations.ACT2FN`).
        norm_type (`str`): `"rmsnorm"`, `"layernorm"` or `"dyt"` (Dynamic Tanh).
        norm_eps (`float`): epsilon of RMSNorm/LayerNorm.
        dyt_alpha_init (`float`): initial `alpha` of every DyT.
        hidden_dropout (`float`): dropout on the residual branches and before classifier heads.
        bidirectional (`bool`): mix in both directions (encoders: masked LM, classification, QA). Causal LM refuses it.
        classifier_pooling (`str`): sequence-classification pooling; `"auto"` is the last real token for causal
            models and the mean of real tokens for bidirectional ones.
        use_layer_features (`bool`): heads read a learned softmax-weighted mix of every layer's hidden states.
    """

    vocab_size: int = positive_int_field(default=264)
    hidden_size: int = positive_int_field(default=256)
    num_hidden_layers: int = positive_int_field(default=4)
    hidden_act: str = "silu"
    norm_type: NormType = "rmsnorm"
    norm_eps: float = positive(1e-6)
    dyt_alpha_init: float = positive(0.5)
    hidden_dropout: float = dropout()
    bidirectional: bool = False
    classifier_pooling: Pooling = "auto"
    use_layer_features: bool = False
    initializer_range: float = interval(min=0.0)(default=0.02)
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2

    def validate_hidden_act(self):
        """The FFN activation must exist (an unknown name would fail only when the model is built or run)."""
        check_hidden_act(self.hidden_act)

    def validate_pad_token_id(self):
        """The pad id indexes the embedding (`padding_idx`) and the tokenizer's padding: it must be in the vocabulary."""
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"`pad_token_id` ({self.pad_token_id}) must be a token id in [0, vocab_size={self.vocab_size}) or "
                "None: use the tokenizer's pad id, or raise `vocab_size` to cover the tokenizer."
            )


@strict
class SequenceConfig(CommonConfig):
    r"""
    Shared configuration of the hf_extras sequence families (one config serves every task head).

    Args (besides the common ones in `CommonConfig`):
        num_heads (`int`): heads of the token mixer (alias `num_attention_heads`).
        intermediate_size (`int`, *optional*): FFN width; `None` means 4x hidden (mlp) or 8/3x hidden rounded to 8 (glu, moe).
        dyt_final_weight_init (`float`, *optional*): initial `weight` of the final DyT (the one the heads read); the
            others start at 1. `None` means `max(1, 1 / (initializer_range * sqrt(hidden_size)))`: 1 for the paper's
            widths (>= 2500 at the default range), larger for narrow models. Why: a DyT's output is bounded by its
            `weight`, so logits through a tied head of std `initializer_range` are at most about
            `weight * initializer_range * sqrt(hidden_size)` (0.23 at width 128). A narrow DyT LM cannot express even
            the unigram distribution with `weight` 1; it inflates the residual stream until every `tanh` saturates
            and stalls at the unigram loss (README, "Seq2seq"). The rule makes that bound ~1 at any width.
        ffn_type (`str`): `"mlp"`, `"glu"` (SwiGLU-style), `"moe"` (top-k routed GLU experts) or `"none"` (blocks
            are `x = x + mixer(norm(x))` only, as in Mamba).
        num_experts, num_experts_per_tok (`int`): MoE size and top-k.
        router_aux_loss_coef (`float`): weight of the load-balancing loss added to the training loss.
        forward_mode (`str`): kernel form, `"auto"` picks by input length.
        chunk_size (`int`): chunk length of the chunkwise form.
        residual_in_fp32 (`bool`): keep the residual stream in float32 under reduced-precision weights/autocast.
        num_decoder_layers (`int`, *optional*): decoder blocks of the seq2seq head (`...ForConditionalGeneration`),
            whose encoder has `num_hidden_layers`; `None` means as many as the encoder.
        decoder_start_token_id (`int`, *optional*): first decoder input of the seq2seq head (labels are shifted
            right behind it); `None` means `bos_token_id` (or `pad_token_id` without one).
        add_cross_attention (`bool`): give every block a softmax cross-attention over encoder states after its
            mixer (set on the seq2seq head's decoder stack; rarely set by hand).
        layer_types (`list[str]`, *optional*): the layer schedule, one entry per block in transformers' vocabulary:
            `"linear_attention"` (the family's own mixer), `"full_attention"` or `"sliding_attention"` (softmax
            attention layers, rotary positions, a KV cache; sliding ones see the last `sliding_window` tokens).
            `None` means every block is the family's own mixer (what every folder saved before hybrids holds).
            `hf_extras.models.hybrid.hybrid_schedule` builds the usual ones (`"3:1"`, ...). A seq2seq decoder of
            another depth (`num_decoder_layers`) repeats the schedule to its depth.
        sliding_window (`int`, *optional*): window of the `"sliding_attention"` layers (needed when there are any).
    """

    attribute_map = {"num_attention_heads": "num_heads"}

    num_heads: int = positive_int_field(default=4)
    intermediate_size: int | None = positive_int_field(default=None)
    dyt_final_weight_init: float | None = optional_positive(default=None)
    ffn_type: FfnType = "glu"
    num_experts: int = positive_int_field(default=8)
    num_experts_per_tok: int = positive_int_field(default=2)
    router_aux_loss_coef: float = interval(min=0.0)(default=0.01)
    forward_mode: ForwardMode = "auto"
    chunk_size: int = positive_int_field(default=64)
    residual_in_fp32: bool = False
    num_decoder_layers: int | None = positive_int_field(default=None)
    decoder_start_token_id: int | None = None
    add_cross_attention: bool = False
    layer_types: list[str] | None = None
    sliding_window: int | None = positive_int_field(default=None)

    def __post_init__(self, **kwargs):
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.bos_token_id if self.bos_token_id is not None else self.pad_token_id
        if self.intermediate_size is None:
            if self.ffn_type in ("mlp", "none"):
                self.intermediate_size = 4 * self.hidden_size
            else:
                self.intermediate_size = 8 * ((8 * self.hidden_size // 3 + 7) // 8)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def resolved_layer_types(self) -> list[str]:
        """`layer_types`, or all `"linear_attention"` when it is `None`."""
        if self.layer_types is None:
            return ["linear_attention"] * self.num_hidden_layers
        return list(self.layer_types)

    @property
    def is_hybrid(self) -> bool:
        """Whether any block is a softmax attention layer."""
        return any(kind != "linear_attention" for kind in self.resolved_layer_types)

    @property
    def resolved_dyt_final_weight_init(self) -> float:
        """Initial `weight` of the final DyT: `dyt_final_weight_init`, or the width rule when that is `None`."""
        if self.dyt_final_weight_init is not None:
            return self.dyt_final_weight_init
        return max(1.0, 1.0 / (self.initializer_range * math.sqrt(self.hidden_size)))

    def stack_config(self, role: Literal["encoder", "decoder"]) -> "SequenceConfig":
        """The config of one stack of the seq2seq head: a bidirectional encoder of `num_hidden_layers` blocks, or a
        causal decoder of `num_decoder_layers` blocks with cross-attention. A copy: the head's config is the saved one.
        """
        stack = copy.deepcopy(self)
        stack.is_encoder_decoder = False
        stack.bidirectional = role == "encoder"
        stack.add_cross_attention = role == "decoder"
        stack.use_cache = self.use_cache and role == "decoder"
        if role == "decoder" and self.num_decoder_layers is not None:
            stack.num_hidden_layers = self.num_decoder_layers
            if self.layer_types is not None:  # the schedule's period, repeated to the decoder's depth
                schedule = list(self.layer_types)
                stack.layer_types = [schedule[i % len(schedule)] for i in range(self.num_decoder_layers)]
        return stack

    @property
    def rotary_positions(self) -> bool:
        """Whether the mixers rotate q/k (the backbone then computes the rotary tables once per forward)."""
        return False

    def validate_heads_divide_width(self):
        """The width must split evenly into heads."""
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_heads` ({self.num_heads}): "
                f"pick a hidden size that is a multiple of {self.num_heads}, or another head count."
            )

    def validate_decoder_start_token(self):
        """The seq2seq head's decoder start token must be a token id."""
        start = self.decoder_start_token_id
        if start is not None and not 0 <= start < self.vocab_size:
            raise ValueError(
                f"`decoder_start_token_id` ({start}) must be a token id in [0, vocab_size={self.vocab_size}): "
                "use the tokenizer's bos or pad id."
            )

    def validate_moe_routing(self):
        """MoE routing must select between 1 and `num_experts` experts."""
        if self.ffn_type == "moe" and self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) must be between 1 and "
                f"`num_experts` ({self.num_experts})."
            )

    def validate_rotary_head_dim(self):
        """Rotary positions rotate channel pairs: the head dim must be even."""
        if self.rotary_positions and self.head_dim % 2 != 0:
            raise ValueError(
                f"`hidden_size / num_heads` ({self.hidden_size}/{self.num_heads}) must be even for rotary positions: "
                "pick another head count or turn rotary positions off."
            )

    def validate_layer_schedule(self):
        """`layer_types`: one known kind per block; sliding layers need `sliding_window`."""
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, (list, tuple)):
            raise ValueError(f"`layer_types` must be a list of layer kinds, got {self.layer_types!r}.")
        unknown = sorted({kind for kind in self.layer_types if kind not in SEQUENCE_LAYER_TYPES})
        if unknown:
            raise ValueError(
                f"`layer_types` has unknown entries {unknown}: use {list(SEQUENCE_LAYER_TYPES)} "
                '("linear_attention" is the family\'s own mixer).'
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is "
                f"{self.num_hidden_layers}: give one entry per block."
            )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(
                '`layer_types` has "sliding_attention" layers but `sliding_window` is None: set `sliding_window` '
                "(the number of past tokens a sliding layer sees)."
            )
