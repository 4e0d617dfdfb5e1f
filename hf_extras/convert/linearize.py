"""Linearize a pretrained softmax Transformer: copy a transformers Llama-style causal LM into an hf_extras linear one.

`linearize(teacher, into=...)` returns our causal LM with every weight the two architectures share copied from the
teacher (embeddings, block and final RMSNorms with their eps, SwiGLU FFNs, LM head tied or not, q/k/v/o projections),
and the parameters the teacher lacks (decays, gates, norms) initialised so the copy starts as close to the teacher as
the mixer allows; `layer_types` keeps chosen layers as the teacher's exact softmax attention (a hybrid). The copy is
not yet a good model: softmax attention is not linear attention. The two-stage recipe (`hf-extras train
configs/linearize.yaml`, `hf_extras.tasks.linearize`) then trains each new linear mixer to reproduce its teacher
layer's attention output (`attention_transfer_loss`), then the whole model on next-token loss plus an optional
distillation term (SUPRA, Mercat et al. 2024; LoLCATs, Zhang et al. 2024).

    >>> from transformers import AutoModelForCausalLM
    >>> from hf_extras.convert import linearize
    >>> teacher = AutoModelForCausalLM.from_pretrained("path/to/llama")
    >>> student = linearize(teacher, into="hfx_gated_retention")      # gate="head", rotary, no output gate
    >>> student = linearize(teacher, into="hfx_gated_retention", gate="key", feature_map="elu")  # config overrides
    >>> hybrid = linearize(teacher, into="hfx_gated_deltanet", layer_types="3:1")  # every 4th layer: attention

Teachers: `llama`, `mistral`, `qwen2`, `qwen3` model types with Llama's layout. Refused, each with an error naming
the field: q/k/v/o biases (`attention_bias`; Qwen2 always has them), `mlp_bias`, Qwen3's `q_norm`/`k_norm`, rotary
scaling (`rope_parameters["rope_type"]` other than `"default"`, `partial_rotary_factor`) for targets that rotate q/k
or keep attention layers, and sliding windows where the student would see more than the teacher (below).

Hybrid students (`layer_types`, transformers' vocabulary, one entry per teacher layer, or a `hybrid_schedule` preset
such as `"3:1"` / `"3:1-sliding"`): a `"full_attention"` or `"sliding_attention"` layer is our hybrid attention layer
(DyT's softmax self-attention) with the teacher's q/k/v/o (k/v heads expanded as below: ours has no grouped heads),
its `rope_theta` and, for sliding layers, its `sliding_window`, so it computes exactly the teacher's layer (same
masks from transformers' masking utilities, scale `head_dim^-0.5`, same rotary convention); a model with every layer
kept gives the teacher's logits. Linear layers are as below. What the teacher's layers are (`teacher_layer_types`):
Llama none slide; Mistral slides in every layer when `sliding_window` is set (it ignores a `layer_types` entry);
Qwen2/Qwen3 follow their `layer_types` (from `use_sliding_window`, `max_window_layers`). A teacher's sliding layer
maps exactly to `"sliding_attention"`; made linear or `"full_attention"` it would see the whole past, refused unless
`ignore_sliding_window=True` (exact for texts shorter than the window); `"sliding_attention"` where the teacher
attends to the whole past is refused. Kept attention layers need the teacher's `head_dim` to be
`hidden_size / num_attention_heads` (our attention heads' width).

What maps where (teacher -> ours), `{i}` a block:

    model.embed_tokens.weight                   -> model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight     -> model.layers.{i}.mixer_norm.weight       (norm_eps = rms_norm_eps)
    model.layers.{i}.self_attn.q_proj.weight    -> model.layers.{i}.mixer.q_proj.weight  (linear or kept attention)
    model.layers.{i}.self_attn.{k,v}_proj.weight -> model.layers.{i}.mixer.{k,v}_proj.weight  (kv heads repeated)
    model.layers.{i}.self_attn.o_proj.weight    -> model.layers.{i}.mixer.o_proj.weight
    model.layers.{i}.post_attention_layernorm.weight -> model.layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  -> model.layers.{i}.ffn.{gate,up,down}_proj.weight (ffn_type="glu")
    model.norm.weight                           -> model.norm.weight
    lm_head.weight                              -> lm_head.weight  (tie_word_embeddings copied; tied: nothing to copy)

Grouped-query heads: every target gets the teacher's `num_attention_heads` heads of width `head_dim`; k and v rows
are repeated per group (`repeat_kv`'s order: query head h reads kv head h // group), so each head's q.k and v start
as the teacher's and the copies then train apart. Gated DeltaNet's `num_key_heads` groups the other way (one q/k
head serves several value heads), which cannot hold Llama's grouping (one k/v head serving several queries), so it is
expanded too.

Per target (defaults below are overridable keyword arguments, e.g. `use_output_gate=True`; the shape fields copied
from the teacher are not):

| target | positions | decay at the start | other new parameters |
| --- | --- | --- | --- |
| `hfx_gated_retention` (`gate="head"`, `feature_map="identity"`) | rotary, the teacher's `rope_theta`, same half-split convention (`use_rotary=True`) | per head, data-dependent; gate weights 0 and biases set so head h starts at a fixed decay `1 - 1/horizon_h`, horizons log-spaced over `decay_horizons` (32..2048 tokens): slow, multi-scale, as RetNet | `use_output_gate=False` (the teacher has none), `g_norm` weights 1, `use_short_conv=False`; `gate="key"`: the low-rank gate's second projection 0, biases as above |
| `hfx_retnet` | rotary, the teacher's `rope_theta` | RetNet's fixed `1 - 2^(-5-h)` (no parameter) | `use_output_gate=False`, `g_norm` weights 1 |
| `hfx_gated_deltanet` (`gate="head"`) | none (the family has no rotary; the decay and delta rule carry order) | `a_proj` 0, `A_log` 0, `dt_bias = softplus^-1(-log(1 - 1/horizon_h))`: same slow schedule | `b_proj` 0 (beta = 0.5 for every token), `use_short_conv=False`, `use_output_gate=False`, `o_norm` weights 1 |

A short conv switched on by override starts as the identity tap (last tap 1, others 0; SiLU still follows it), an
output gate switched on starts from the family's random init. The per-head output norm every target has (RMS to 1
per head) has no counterpart in softmax attention; stage 1 of the recipe learns its gain.

`attention_window=W` (any target) adds the mixers' exact softmax window (LoLCATs; `models/window_attention.py`) on
the copied q/k/v, rotary with the teacher's `rope_theta` (Gated DeltaNet gets rotary tables for the window alone):
with the output norms' weights at 0 and a window as long as the text, the copy gives the teacher's logits. They start
at 1 all the same, as without a window: the linear part must be on to learn (README, "Linearizing").
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..errors import ConfigError
from ..models.configuration_common import SEQUENCE_LAYER_TYPES
from ..models.configuration_gated_deltanet import GatedDeltaNetConfig
from ..models.configuration_gated_retention import GatedRetentionConfig
from ..models.configuration_retnet import RetNetConfig
from ..models.hybrid import hybrid_schedule
from ..models.modeling_gated_deltanet import GatedDeltaNetForCausalLM
from ..models.modeling_gated_retention import GatedRetentionForCausalLM
from ..models.modeling_retnet import RetNetForCausalLM
from ..models.positions import positions_from_mask, rotary_cos_sin

__all__ = [
    "LINEARIZE_TARGETS",
    "SUPPORTED_TEACHERS",
    "attention_transfer_loss",
    "check_teacher",
    "decay_schedule",
    "kl_to_teacher",
    "linear_layer_indices",
    "linearize",
    "linearized_config",
    "repeat_kv_rows",
    "resolve_layer_types",
    "teacher_attention_io",
    "teacher_layer_types",
]

SUPPORTED_TEACHERS = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_DECAY_HORIZONS = (32.0, 2048.0)

# into -> (config class, causal-LM class, target defaults the user may override)
LINEARIZE_TARGETS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "hfx_gated_retention": (
        GatedRetentionConfig,
        GatedRetentionForCausalLM,
        {
            "gate": "head",
            "feature_map": "identity",
            "use_rotary": True,
            "use_output_gate": False,
            "use_short_conv": False,
        },
    ),
    "hfx_retnet": (RetNetConfig, RetNetForCausalLM, {"use_output_gate": False}),
    "hfx_gated_deltanet": (
        GatedDeltaNetConfig,
        GatedDeltaNetForCausalLM,
        {"gate": "head", "use_short_conv": False, "use_output_gate": False},
    ),
}

# fields linearize derives from the teacher's shapes; overriding one would break the copy
_DERIVED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_heads",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "norm_type",
    "norm_eps",
    "ffn_type",
    "key_factor",
    "value_factor",
    "num_key_heads",
    "key_head_dim",
    "value_head_dim",
    "rope_theta",
    "tie_word_embeddings",
    "bidirectional",
    "sliding_window",
)


def _teacher_rope(config) -> tuple[float, str, float]:
    """(rope_theta, rope_type, partial_rotary_factor) of a transformers 5 config (`rope_parameters`)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):  # per-layer-type form
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    return float(theta), str(params.get("rope_type", "default")), float(partial)


def check_teacher(teacher: PreTrainedModel, rotary: bool) -> None:
    """Refuse a teacher whose weights or positions do not map onto ours (`rotary`: the student rotates q/k, in its
    linear mixers or in kept attention layers), naming the field and the fix. Sliding windows are checked against
    the student's schedule by `resolve_layer_types`."""
    config = teacher.config
    if config.model_type not in SUPPORTED_TEACHERS:
        raise ConfigError(
            f"linearize: teacher model_type {config.model_type!r} is not supported; Llama-style causal LMs of "
            f"model_type {', '.join(SUPPORTED_TEACHERS)} are (q/k/v/o projections, SwiGLU MLP, RMSNorm)."
        )
    base = getattr(teacher, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(teacher, "lm_head"):
        raise ConfigError(
            f"linearize needs the causal LM ({type(teacher).__name__} has no `.model.layers` / `.lm_head`): load "
            "the teacher with AutoModelForCausalLM."
        )
    attn, mlp = base.layers[0].self_attn, base.layers[0].mlp
    if any(getattr(attn, f"{p}_proj").bias is not None for p in "qkvo"):
        raise ConfigError(
            "linearize: the teacher's attention projections have biases (`attention_bias`; Qwen2 always has q/k/v "
            "biases), which our mixers lack. Use a teacher without them."
        )
    if any(getattr(mlp, f"{p}_proj").bias is not None for p in ("gate", "up", "down")):
        raise ConfigError("linearize: the teacher's MLP has biases (`mlp_bias=True`), which our GLU FFN lacks.")
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        raise ConfigError(
            "linearize: the teacher normalises q and k per head (Qwen3's `q_norm`/`k_norm`), which our mixers lack; "
            "there is no weight-only map for an RMSNorm on q/k."
        )
    theta, rope_type, partial = _teacher_rope(config)
    if rotary and rope_type != "default":
        raise ConfigError(
            f"linearize: the teacher's rotary positions are scaled (`rope_parameters['rope_type']={rope_type!r}`); "
            "ours compute the default table only. Pick a target without rotary (hfx_gated_deltanet without "
            "attention_window, or hfx_gated_retention with use_rotary=False) and keep no attention layer "
            "(`layer_types`)."
        )
    if rotary and partial != 1.0:
        raise ConfigError(
            f"linearize: the teacher rotates a part of each head (`partial_rotary_factor={partial}`); ours rotate "
            "whole heads. Pick a target without rotary and keep no attention layer (`layer_types`)."
        )


def teacher_layer_types(config) -> tuple[list[str], int | None]:
    """Each teacher layer's attention kind (`"full_attention"` or `"sliding_attention"`) and the window, as the
    teacher's own transformers model reads its config.

    Mistral applies `sliding_window` (when set) to every layer and ignores a `layer_types` entry (its config only
    warns); Qwen2/Qwen3 follow `layer_types`, which their configs derive from `use_sliding_window` and
    `max_window_layers` (and which slide only when `sliding_window` is set); Llama has no window.
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return ["sliding_attention" if window is not None else "full_attention"] * n, window
    kinds = getattr(config, "layer_types", None) if config.model_type in ("qwen2", "qwen3") else None
    if kinds is None:
        return ["full_attention"] * n, None
    unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConfigError(f"linearize: the teacher's `layer_types` has kinds {unknown} that are not softmax attention.")
    if "sliding_attention" in kinds and window is None:
        raise ConfigError(
            "linearize: the teacher's `layer_types` has sliding layers but its `sliding_window` is None "
            "(`use_sliding_window=False`); transformers cannot run it either. Fix the teacher's config."
        )
    return list(kinds), window


def resolve_layer_types(
    teacher_config, layer_types: list[str] | str | None, ignore_sliding_window: bool = False
) -> tuple[list[str] | None, int | None]:
    """The student's schedule (`None`: every layer linear) and `sliding_window`, from `layer_types` (a list in
    transformers' vocabulary, one entry per teacher layer, or a `hybrid_schedule` preset name such as `"3:1"`, also as
    a one-entry list as the command line gives it), checked against the teacher's layers.

    A kept attention layer must be the teacher's layer exactly: `"full_attention"` where the teacher attends to the
    whole past, `"sliding_attention"` (with the teacher's window) where it slides. A linear or full layer where the
    teacher slides sees more than the teacher did: refused unless `ignore_sliding_window` (exact for texts shorter
    than the window). Errors name the field and the layers.
    """
    n = teacher_config.num_hidden_layers
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == 1 and layer_types[0] not in SEQUENCE_LAYER_TYPES:
        layer_types = layer_types[0]  # `--layer_types 3:1`
    if layer_types is None:
        schedule = ["linear_attention"] * n
    elif isinstance(layer_types, str):
        try:
            schedule = hybrid_schedule(layer_types, n)
        except ValueError as error:
            raise ConfigError(f"linearize: `layer_types`: {error}") from None
    else:
        schedule = list(layer_types)
    unknown = sorted({str(kind) for kind in schedule if kind not in SEQUENCE_LAYER_TYPES})
    if unknown:
        raise ConfigError(
            f"linearize: `layer_types` has unknown entries {unknown}: use {list(SEQUENCE_LAYER_TYPES)} "
            '("linear_attention" is the target\'s own mixer) or a preset name such as "3:1" or "3:1-sliding".'
        )
    if len(schedule) != n:
        raise ConfigError(
            f"linearize: `layer_types` has {len(schedule)} entries but the teacher has {n} layers "
            '(`num_hidden_layers`): give one entry per teacher layer, or a preset name such as "3:1".'
        )
    theirs, window = teacher_layer_types(teacher_config)
    widened = [i for i, (a, b) in enumerate(zip(schedule, theirs)) if b == "sliding_attention" and a != b]
    narrowed = [i for i, (a, b) in enumerate(zip(schedule, theirs)) if a == "sliding_attention" and a != b]
    if narrowed:
        raise ConfigError(
            f'linearize: `layer_types` makes layers {narrowed} "sliding_attention", but the teacher attends to the '
            'whole past there (no `sliding_window` there): keep them as "full_attention" (exact) or "linear_attention".'
        )
    if widened and not ignore_sliding_window:
        raise ConfigError(
            f"linearize: the teacher's layers {widened} attend within a sliding window (`sliding_window={window}`), "
            f"but `layer_types` makes them {sorted({schedule[i] for i in widened})}, which see the whole past. Keep "
            'them as "sliding_attention" (exact: the teacher\'s layer and window; preset "L:A-sliding"), or pass '
            "`ignore_sliding_window=True` to accept it (exact for texts shorter than the window)."
        )
    resolved = None if layer_types is None else schedule
    return resolved, window if "sliding_attention" in schedule else None


def linear_layer_indices(config) -> list[int]:
    """The blocks of our `config` whose mixer is the family's own (`"linear_attention"`): those stage 1 trains."""
    return [i for i, kind in enumerate(config.resolved_layer_types) if kind == "linear_attention"]


def decay_schedule(num_heads: int, horizons: tuple[float, float] = DEFAULT_DECAY_HORIZONS) -> torch.Tensor:
    """Per-head log decays `log(1 - 1/h)` for horizons `h` log-spaced from `horizons[0]` to `horizons[1]` tokens."""
    low, high = (float(h) for h in horizons)
    if not 1.0 < low <= high:
        raise ValueError(f"`decay_horizons` must satisfy 1 < low <= high (tokens), got {horizons}.")
    if num_heads == 1:
        steps = torch.tensor([math.log(high)], dtype=torch.float64)
    else:
        steps = torch.linspace(math.log(low), math.log(high), num_heads, dtype=torch.float64)
    return torch.log1p(-torch.exp(-steps)).float()


def linearized_config(
    teacher_config,
    into: str,
    layer_types: list[str] | str | None = None,
    ignore_sliding_window: bool = False,
    **config_overrides: Any,
) -> tuple[Any, int]:
    """Our config for `teacher_config` (shape fields and the layer schedule from the teacher and `layer_types`, see
    `resolve_layer_types`; target defaults, then `config_overrides`) and the teacher's heads per kv head (`group`)."""
    if into not in LINEARIZE_TARGETS:
        raise ConfigError(f"linearize: `into={into!r}` is not supported; choose one of {', '.join(LINEARIZE_TARGETS)}")
    fixed = sorted(set(config_overrides) & set(_DERIVED))
    if fixed:
        raise ConfigError(
            f"linearize: {', '.join(f'`{k}`' for k in fixed)} come from the teacher's weights and config and cannot "
            "be overridden (the copy would not fit); change the teacher instead."
        )
    config_class, _, defaults = LINEARIZE_TARGETS[into]
    c = teacher_config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if heads % kv_heads:
        raise ConfigError(f"linearize: `num_attention_heads` ({heads}) is not a multiple of `num_key_value_heads`.")
    if c.hidden_size % heads:
        raise ConfigError(
            f"linearize: `hidden_size` ({c.hidden_size}) is not a multiple of `num_attention_heads` ({heads}); our "
            "configs split the width evenly into heads."
        )
    width = heads * head_dim
    schedule, window = resolve_layer_types(c, layer_types, ignore_sliding_window)
    if schedule is not None and set(schedule) != {"linear_attention"} and width != c.hidden_size:
        raise ConfigError(
            f"linearize: kept attention layers (`layer_types`) have heads of `hidden_size / num_attention_heads` "
            f"({c.hidden_size // heads}) channels, but the teacher's `head_dim` is {head_dim}; keep no attention "
            "layer for this teacher."
        )
    values: dict[str, Any] = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_heads=heads,
        intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act,
        norm_type="rmsnorm",
        norm_eps=float(c.rms_norm_eps),
        ffn_type="glu",
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        initializer_range=float(c.initializer_range),
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    if into == "hfx_gated_deltanet":
        values.update(num_key_heads=heads, key_head_dim=head_dim, value_head_dim=head_dim)
    else:
        if width % c.hidden_size:
            raise ConfigError(
                f"linearize into {into}: the value width `num_attention_heads * head_dim` ({heads} * {head_dim}) "
                f"must be a whole multiple of `hidden_size` ({c.hidden_size}) (`value_factor` is an integer); use "
                "hfx_gated_deltanet, whose head widths are free."
            )
        values.update(key_factor=width / c.hidden_size, value_factor=width // c.hidden_size)
    values["rope_theta"] = _teacher_rope(c)[0]  # rotary mixers and kept attention layers
    if schedule is not None:
        values.update(layer_types=schedule, sliding_window=window)
    values.update(defaults)
    values.update(config_overrides)
    return config_class(**values), heads // kv_heads


def repeat_kv_rows(weight: torch.Tensor, group: int, head_dim: int) -> torch.Tensor:
    """k/v rows `(kv_heads * head_dim, ...)` -> `(kv_heads * group * head_dim, ...)`, head h reading kv head
    `h // group` (the order of transformers' `repeat_kv` and fla's `repeat(... h d -> (h g) d)`); any trailing dims
    (a projection's input, a depthwise conv's taps) are kept."""
    if group == 1:
        return weight
    rows = weight.view(-1, head_dim, *weight.shape[1:])
    return rows.repeat_interleave(group, dim=0).reshape(-1, *weight.shape[1:])


@torch.no_grad()
def _init_new_parameters(mixer: nn.Module, into: str, config, horizons: tuple[float, float]) -> None:
    """Start the parameters the teacher lacks near the teacher: slow multi-scale decays, identity conv, norms at 1."""
    log_a = decay_schedule(config.num_heads, horizons)  # (H,)
    if into == "hfx_gated_retention" and config.gate != "none":
        # log a = logsigmoid(z) / tau with z = bias at zero weight  =>  z = logit(exp(tau * log a))
        target = torch.exp(config.gate_logit_normalizer * log_a.double())
        bias = torch.log(target) - torch.log1p(-target)
        last = mixer.gk_proj if config.gate == "head" else mixer.gk_proj[1]
        last.weight.zero_()
        per_channel = bias if config.gate == "head" else bias.repeat_interleave(mixer.head_dim)
        last.bias.copy_(per_channel.to(last.bias.dtype))
    if into == "hfx_gated_deltanet":
        mixer.b_proj.weight.zero_()  # beta = sigmoid(0) = 0.5 for every token
        if config.gate == "head":
            mixer.a_proj.weight.zero_()
            mixer.A_log.zero_()  # A = 1: log a = -softplus(dt_bias)
            dt = (-log_a).double()
            mixer.dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(mixer.dt_bias.dtype))  # softplus^-1
    norm = getattr(mixer, "g_norm", None) or getattr(mixer, "o_norm", None)
    # 1 with a softmax window too: starting the linear part at 0 trained worse at short windows (README, "Linearizing")
    norm.weight.fill_(1.0)
    conv = getattr(mixer, "conv1d", None)
    if conv is not None:  # identity tap: the conv passes its input through (SiLU still follows)
        conv.weight.zero_()
        conv.weight[..., -1] = 1.0


def linearize(
    model: PreTrainedModel,
    into: str = "hfx_gated_retention",
    layer_types: list[str] | str | None = None,
    *,
    decay_horizons: tuple[float, float] = DEFAULT_DECAY_HORIZONS,
    ignore_sliding_window: bool = False,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Our causal LM `into` a family, with the teacher `model`'s shared weights copied (see the module docstring).

    `layer_types` keeps some layers as softmax attention (a list in transformers' vocabulary, one entry per teacher
    layer, or a `hybrid_schedule` preset such as `"3:1"`; `None`: every layer linear): those layers get the teacher's
    q/k/v/o (k/v heads expanded), rotary base and window and compute exactly the teacher's layer; see
    `resolve_layer_types` for what maps where. `decay_horizons`: (shortest, longest) initial memory in tokens of the
    data-dependent decays. Any other keyword is a config field of the target (e.g. `gate="key"`,
    `feature_map="elu"`, `use_short_conv=True`). The result has the teacher's dtype and device, in eval mode as
    `from_pretrained` leaves a model.
    """
    check_teacher(model, rotary=False)
    config, group = linearized_config(model.config, into, layer_types, ignore_sliding_window, **config_overrides)
    if config.rotary_positions or config.is_hybrid:  # the attention layers rotate q/k with the default table
        check_teacher(model, rotary=True)
    _, lm_class, _ = LINEARIZE_TARGETS[into]
    student = lm_class(config)
    teacher = model.model
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(teacher.embed_tokens.weight)
        student.model.norm.weight.copy_(teacher.norm.weight)
        for kind, ours, theirs in zip(config.resolved_layer_types, student.model.layers, teacher.layers, strict=True):
            attn, mixer = theirs.self_attn, ours.mixer
            ours.mixer_norm.weight.copy_(theirs.input_layernorm.weight)
            ours.ffn_norm.weight.copy_(theirs.post_attention_layernorm.weight)
            # the same four projections in a linear mixer and in a kept attention layer (ours has no GQA: expanded)
            mixer.q_proj.weight.copy_(attn.q_proj.weight)
            mixer.k_proj.weight.copy_(repeat_kv_rows(attn.k_proj.weight, group, head_dim))
            mixer.v_proj.weight.copy_(repeat_kv_rows(attn.v_proj.weight, group, head_dim))
            mixer.o_proj.weight.copy_(attn.o_proj.weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(ours.ffn, name).weight.copy_(getattr(theirs.mlp, name).weight)
            if kind == "linear_attention":
                _init_new_parameters(mixer, into, config, decay_horizons)
        if not config.tie_word_embeddings:
            student.lm_head.weight.copy_(model.lm_head.weight)
    student.generation_config.pad_token_id = config.pad_token_id
    return student.to(device=model.device, dtype=model.dtype).eval()


def teacher_attention_io(
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    layers: list[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The attention input (after the input norm) and output (before the residual) of the teacher's `layers`
    (default: every layer), in layer order, no gradient.

    Read with forward hooks on those layers' `self_attn` during one forward of the teacher's base model.
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def grab_input(module, args, kwargs):
        inputs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def grab_output(module, args, kwargs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = []
    chosen = range(len(teacher.model.layers)) if layers is None else layers
    for index in chosen:
        attn = teacher.model.layers[index].self_attn
        handles.append(attn.register_forward_pre_hook(grab_input, with_kwargs=True))
        handles.append(attn.register_forward_hook(grab_output, with_kwargs=True))
    try:
        with torch.no_grad():
            teacher.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def attention_transfer_loss(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-layer mean squared error between each student linear mixer's output and its teacher layer's attention
    output, both given the teacher's attention input (stage 1 of linearizing, "attention transfer").

    One entry per linear layer, in block order (`linear_layer_indices`): the attention layers a hybrid student kept
    are the teacher's own layers (their error is 0 up to rounding) and are skipped, not computed. Layers are
    independent (each sees the teacher's input, not the previous student layer's output), over real tokens only;
    the gradient reaches the student's linear mixers and nothing else.
    """
    base = student.get_base_model().model if hasattr(student, "get_base_model") else student.model
    config = base.config
    linear = linear_layer_indices(config)
    if not linear:
        raise ConfigError(
            "attention_transfer_loss: every layer of the student is softmax attention (`layer_types`), copied "
            "exactly from the teacher; there is no linear mixer to train (skip stage 1: stage1_steps=0)."
        )
    position_ids = positions_from_mask(attention_mask, input_ids.shape[1], 0, input_ids.device)
    position_ids = position_ids.expand(input_ids.shape[0], -1)
    layer_in, layer_out = teacher_attention_io(teacher, input_ids, attention_mask, position_ids, linear)
    tables = None
    if config.rotary_positions:
        tables = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta)
    mask = attention_mask[..., None].to(torch.float32) if attention_mask is not None else None
    losses = []
    for index, x, target in zip(linear, layer_in, layer_out, strict=True):
        layer = base.layers[index]
        mixer_dtype = layer.mixer_norm.weight.dtype
        pred = layer.mixer(x.to(mixer_dtype), attention_mask=attention_mask, position_ids=position_ids,
                           position_embeddings=tables, cache=None)  # fmt: skip
        err = (pred.float() - target.float()).pow(2)
        if mask is None:
            losses.append(err.mean())
        else:
            losses.append((err * mask).sum() / (mask.sum().clamp_min(1.0) * err.shape[-1]))
    return torch.stack(losses)


def kl_to_teacher(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """`T^2 * KL(teacher_T || student_T)` per predicted token (softmaxes at temperature `T`), summed over the
    positions that carry a next-token label (`labels[:, 1:] != -100`, as the LM loss counts them) and averaged over
    them (`reduction="mean"`) or returned as the sum (`"sum"`, for a caller that divides by the accumulated count)."""
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1) * temperature**2
    keep = (labels[:, 1:] != -100).to(per_token.dtype) if labels is not None else torch.ones_like(per_token)
    total = (per_token * keep).sum()
    return total if reduction == "sum" else total / keep.sum().clamp_min(1.0)
