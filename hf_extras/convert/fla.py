"""Import flash-linear-attention (fla) RetNet and GLA checkpoints: `from_fla(folder_or_state_dict, config=None, head=...)`.

fla is not needed: a folder is read as `config.json` plus `*.safetensors` (never pickle), and a state dict comes with
fla's config (a `RetNetConfig`/`GLAConfig` object or its dict). The result is our model (`hfx_retnet` for fla's
`retnet`, `hfx_gated_retention` with `gate="key"` for fla's `gla`) in the head you ask for, with the same logits as
fla's model; `save_pretrained` of it loads without fla (and, with `trust_remote_code=True`, without hf_extras):

    >>> from hf_extras.convert import from_fla
    >>> model = from_fla("path/to/gla-340M-15B")                           # AutoModelForCausalLM semantics
    >>> clf = from_fla("path/to/gla-340M-15B", head="sequence_classification", num_labels=2)  # fresh `score` head
    >>> model.save_pretrained("gla-340M-hfx")

Conventions, fla -> ours (every one either maps exactly or is refused with an error naming the field):

| fla | ours |
| --- | --- |
| `expand_k` (q/k width / hidden) | `key_factor` (float, same meaning; q/k head dim, rotary dim and 1/sqrt(d) follow it) |
| `expand_v` (value width / hidden) | `value_factor` (int; a fractional `expand_v` is refused) |
| q scaled by `head_k_dim ** -0.5` in the kernel | k scaled by `head_dim ** -0.5` (same product q.k) |
| RetNet decay `log(1 - 2^(-5-h))`, h = head | the same (`retnet_log_decay`) |
| RetNet rotary: `RotaryEmbedding(head_k_dim)`, base 10000, half-split (not interleaved), after the feature map | the same (`rope_theta=10000.0`) |
| GLA gate `logsigmoid(gk_proj(x)) / 16`, `gk_proj` = Linear(h, 16) -> Linear(16, key width, bias) | `gate="key"`, `gate_logit_normalizer=16.0`, `gate_low_rank_dim` (read off the weight) |
| GLA `clamp_min` | `gate_clamp_min` |
| `use_output_gate` | `use_output_gate` (False: no `g_proj`, output `o_proj(g_norm(o))`) |
| output gate `hidden_act` = `swish` | silu gate (any other `hidden_act` is refused) |
| `fuse_norm` (fused `g_norm_swish_gate` or `g_norm` + gate) | one `g_norm` RMSNorm then the gate: same numbers, a key rename |
| `elementwise_affine=False` (`g_norm` without weight) | `g_norm.weight` set to ones (exact) |
| `norm_eps` (block, final and group norms) | `norm_eps`, `norm_type="rmsnorm"` |
| GLA `use_short_conv`, `conv_size` (three convs q/k/v, SiLU, no bias) | `use_short_conv`, `conv_size` (one conv over q|k|v, SiLU) |
| RetNet `use_short_conv` | ignored, as fla's `RetNetBlock` ignores it (it builds no conv) |
| `feature_map` | GLA: `None` -> `"identity"`, `"relu"` -> `"relu"`; anything else refused; RetNet: only `None` |
| `num_kv_heads` < `num_heads` (grouped k/v) | k/v (and GLA gate) rows repeated per group: exact, the copies train independently |
| MLP `GatedMLP`: `hidden_ratio`, `intermediate_size` (None: 256-rounded `2/3 * ratio * hidden`) | `ffn_type="glu"`, `intermediate_size` computed by fla's rule, `hidden_act="silu"` |
| pre-norm blocks, final norm, untied `lm_head` by default | the same; `tie_word_embeddings` copied (fla's default is False) |
| `pad_token_id=None`, `bos_token_id=1`, `eos_token_id=2` | copied (our defaults differ: 0, 2, 1) |
| `attn` (softmax-attention hybrid layers), `attnres_block_size` (attention residuals), older GLA `share_conv_kernel` with a short conv | refused |
| `attn_mode`, `fuse_swiglu`, `fuse_cross_entropy`, `fuse_linear_cross_entropy`, `use_l2warp`, `max_position_embeddings`, GLA `use_gk`/`use_gv` (unused by fla's GLA model) | ignored: kernel choice or training loss only |

Key table (`KEY_TABLE`), fla -> ours; `{i}` is a block index, every fla tensor is consumed exactly once:

    model.embeddings.weight                    -> model.embed_tokens.weight
    model.layers.{i}.attn_norm.weight          -> model.layers.{i}.mixer_norm.weight
    model.layers.{i}.attn.q_proj.weight        -> model.layers.{i}.mixer.q_proj.weight
    model.layers.{i}.attn.k_proj.weight        -> model.layers.{i}.mixer.k_proj.weight      (kv heads repeated)
    model.layers.{i}.attn.v_proj.weight        -> model.layers.{i}.mixer.v_proj.weight      (kv heads repeated)
    model.layers.{i}.attn.g_proj.weight        -> model.layers.{i}.mixer.g_proj.weight
    model.layers.{i}.attn.o_proj.weight        -> model.layers.{i}.mixer.o_proj.weight
    model.layers.{i}.attn.g_norm_swish_gate.weight | attn.g_norm.weight -> model.layers.{i}.mixer.g_norm.weight
    model.layers.{i}.attn.gk_proj.0.weight     -> model.layers.{i}.mixer.gk_proj.0.weight
    model.layers.{i}.attn.gk_proj.1.{weight,bias} -> model.layers.{i}.mixer.gk_proj.1.{weight,bias} (kv heads repeated)
    model.layers.{i}.attn.{q,k,v}_conv1d.weight -> model.layers.{i}.mixer.conv1d.weight (concatenated q|k|v)
    model.layers.{i}.mlp_norm.weight           -> model.layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight -> model.layers.{i}.ffn.{gate,up,down}_proj.weight
    model.norm.weight                          -> model.norm.weight
    lm_head.weight                             -> lm_head.weight   (with tied embeddings: must equal them, dropped)
    model.layers.{i}.attn.rotary.inv_freq      -> none: checked to be the table ours computes (older RetNet saves)

A bare `RetNetModel`/`GLAModel` state dict (keys without `model.`) is accepted too.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..models.configuration_gated_retention import GatedRetentionConfig
from ..models.configuration_retnet import RetNetConfig
from ..models.modeling_gated_retention import AUTO_CLASSES as GATED_RETENTION_CLASSES
from ..models.modeling_retnet import AUTO_CLASSES as RETNET_CLASSES

__all__ = ["KEY_TABLE", "fla_key_to_hfx", "fla_config_to_hfx", "convert_fla_state_dict", "load_fla_folder", "from_fla"]

KEY_TABLE = (
    ("model.embeddings.weight", "model.embed_tokens.weight"),
    ("model.layers.{i}.attn_norm.weight", "model.layers.{i}.mixer_norm.weight"),
    ("model.layers.{i}.attn.q_proj.weight", "model.layers.{i}.mixer.q_proj.weight"),
    ("model.layers.{i}.attn.k_proj.weight", "model.layers.{i}.mixer.k_proj.weight"),
    ("model.layers.{i}.attn.v_proj.weight", "model.layers.{i}.mixer.v_proj.weight"),
    ("model.layers.{i}.attn.g_proj.weight", "model.layers.{i}.mixer.g_proj.weight"),
    ("model.layers.{i}.attn.o_proj.weight", "model.layers.{i}.mixer.o_proj.weight"),
    ("model.layers.{i}.attn.g_norm_swish_gate.weight", "model.layers.{i}.mixer.g_norm.weight"),
    ("model.layers.{i}.attn.g_norm.weight", "model.layers.{i}.mixer.g_norm.weight"),
    ("model.layers.{i}.attn.gk_proj.0.weight", "model.layers.{i}.mixer.gk_proj.0.weight"),
    ("model.layers.{i}.attn.gk_proj.1.weight", "model.layers.{i}.mixer.gk_proj.1.weight"),
    ("model.layers.{i}.attn.gk_proj.1.bias", "model.layers.{i}.mixer.gk_proj.1.bias"),
    ("model.layers.{i}.attn.q_conv1d.weight", "model.layers.{i}.mixer.conv1d.weight"),
    ("model.layers.{i}.attn.k_conv1d.weight", "model.layers.{i}.mixer.conv1d.weight"),
    ("model.layers.{i}.attn.v_conv1d.weight", "model.layers.{i}.mixer.conv1d.weight"),
    ("model.layers.{i}.mlp_norm.weight", "model.layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.ffn.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.ffn.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.ffn.down_proj.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_RULES = [(re.compile("^" + re.escape(fla).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), ours) for fla, ours in KEY_TABLE]

# fla 0.6's config defaults (a config.json may omit fields that equal them)
_FLA_DEFAULTS: dict[str, dict[str, Any]] = {
    "retnet": dict(
        hidden_size=2048, expand_k=1.0, expand_v=2.0, hidden_ratio=2, intermediate_size=None, num_hidden_layers=24,
        num_heads=8, num_kv_heads=None, feature_map=None, hidden_act="swish", use_output_gate=True,
        elementwise_affine=True, norm_eps=1e-6, attn=None, use_cache=True, pad_token_id=None, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, initializer_range=0.02, vocab_size=32000, attnres_block_size=None,
    ),
    "gla": dict(
        hidden_size=2048, expand_k=0.5, expand_v=1.0, hidden_ratio=4, intermediate_size=None, num_hidden_layers=24,
        num_heads=4, num_kv_heads=None, feature_map=None, use_short_conv=False, conv_size=4, use_output_gate=True,
        clamp_min=None, hidden_act="swish", elementwise_affine=True, norm_eps=1e-6, attn=None, use_cache=True,
        pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.02,
        vocab_size=32000, attnres_block_size=None,
    ),
}  # fmt: skip
_FAMILIES = {"retnet": (RetNetConfig, RETNET_CLASSES), "gla": (GatedRetentionConfig, GATED_RETENTION_CLASSES)}
_HEAD_ALIASES = {
    "model": "AutoModel",
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
}
_GLA_NORMALIZER, _GLA_LOW_RANK = 16.0, 16  # fla's GatedLinearAttention defaults; GLABlock never passes others


def _fla_dict(config) -> dict[str, Any]:
    """fla's config (object or dict) as a dict with fla's defaults filled in; checks the model type."""
    if config is None:
        raise ValueError("`config` is required with a state dict: pass fla's RetNetConfig/GLAConfig or its dict.")
    src = dict(config) if isinstance(config, Mapping) else config.to_dict()
    model_type = src.get("model_type")
    if model_type not in _FLA_DEFAULTS:
        raise ValueError(
            f"fla config has model_type {model_type!r}; from_fla imports {sorted(_FLA_DEFAULTS)} "
            "(fla's RetNet and GLA). Other fla families have no hf_extras counterpart yet."
        )
    if "attn" not in src and hasattr(config, "attn"):  # fla keeps `attn` behind a property
        src["attn"] = config.attn
    return {**_FLA_DEFAULTS[model_type], **{k: v for k, v in src.items()}}


def _refuse(field: str, value, why: str):
    raise ValueError(f"fla config field `{field}={value!r}` has no hf_extras counterpart: {why}")


def _fla_intermediate_size(cfg: Mapping[str, Any]) -> int:
    """fla GatedMLP's width: `intermediate_size`, or `2/3 * hidden_ratio * hidden` rounded up to a multiple of 256."""
    if cfg.get("intermediate_size") is not None:
        return int(cfg["intermediate_size"])
    ratio = cfg.get("hidden_ratio") or 4
    width = int(cfg["hidden_size"] * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


def fla_config_to_hfx(config, gate_low_rank_dim: int | None = None, **overrides) -> RetNetConfig | GatedRetentionConfig:
    """Our config for fla's RetNet/GLA config (object or dict); refuses options we have no counterpart for.

    `gate_low_rank_dim` is GLA's gate rank (fla's model always builds 16; `from_fla` reads it off the weights).
    `overrides` set fields that do not change the weights (e.g. `forward_mode`, `num_labels`, `bidirectional`).
    """
    cfg = _fla_dict(config)
    family = cfg["model_type"]
    if cfg.get("attn") is not None:
        _refuse("attn", cfg["attn"], "hybrid softmax-attention layers are not supported by this importer.")
    if cfg.get("attnres_block_size") is not None:
        _refuse("attnres_block_size", cfg["attnres_block_size"], "attention residuals are not an hf_extras block.")
    if cfg.get("hidden_act") not in ("swish", "silu"):
        _refuse("hidden_act", cfg.get("hidden_act"), "only swish (SiLU) gates and SwiGLU MLPs map exactly.")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_heads"])
    expand_v = float(cfg["expand_v"])
    if expand_v != int(expand_v) or expand_v < 1:
        _refuse("expand_v", cfg["expand_v"], "our `value_factor` is a whole multiple of hidden_size.")
    if hidden % heads:
        _refuse("hidden_size", hidden, f"it must be divisible by num_heads={heads} for our value head width.")
    kv_heads = cfg.get("num_kv_heads") or heads
    if heads % kv_heads:
        _refuse("num_kv_heads", kv_heads, f"num_heads={heads} must be a multiple of it.")
    feature_map = cfg.get("feature_map")
    if family == "retnet" and feature_map is not None:
        _refuse("feature_map", feature_map, "our RetNet applies no feature map to q/k.")
    if family == "gla" and feature_map not in (None, "relu"):
        _refuse("feature_map", feature_map, "fla's ACT2FN maps other than relu have no match in our feature maps.")
    if family == "gla" and cfg.get("use_short_conv") and cfg.get("share_conv_kernel"):
        _refuse("share_conv_kernel", True, "older fla GLA's one conv before the projections; ours convolves q, k, v.")
    if family == "gla":
        for field, fixed in (("gate_logit_normalizer", _GLA_NORMALIZER), ("gate_low_rank_dim", gate_low_rank_dim)):
            value = cfg.get(field)
            if value is not None and fixed is not None and float(value) != float(fixed):
                _refuse(field, value, f"fla's GLABlock ignores it and builds {fixed}; the import would be ambiguous.")
    kwargs: dict[str, Any] = dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        key_factor=float(cfg["expand_k"]),
        value_factor=int(expand_v),
        use_output_gate=bool(cfg["use_output_gate"]),
        intermediate_size=_fla_intermediate_size(cfg),
        ffn_type="glu",
        hidden_act="silu",
        norm_type="rmsnorm",
        norm_eps=float(cfg["norm_eps"]),
        initializer_range=float(cfg["initializer_range"]),
        use_cache=bool(cfg["use_cache"]),
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )
    if family == "retnet":
        kwargs["rope_theta"] = 10000.0  # fla's MultiScaleRetention: RotaryEmbedding(dim=head_k_dim), default base
    else:
        clamp = cfg.get("clamp_min")
        kwargs.update(
            gate="key",
            gate_logit_normalizer=_GLA_NORMALIZER,
            gate_low_rank_dim=int(gate_low_rank_dim or _GLA_LOW_RANK),
            gate_clamp_min=None if clamp is None else float(clamp),
            feature_map="relu" if feature_map == "relu" else "identity",
            use_short_conv=bool(cfg["use_short_conv"]),
            conv_size=int(cfg["conv_size"]),
            use_rotary=False,
        )
    kwargs.update(overrides)
    return _FAMILIES[family][0](**kwargs)


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare `RetNetModel`/`GLAModel` state dict gets the `model.` prefix of the causal LM's."""
    if any(key.startswith("model.") for key in state_dict):
        return dict(state_dict)
    return {key if key.startswith("lm_head.") else f"model.{key}": value for key, value in state_dict.items()}


def fla_key_to_hfx(key: str) -> str | None:
    """Our key for an fla (causal-LM) key by `KEY_TABLE`, or `None` when no rule matches."""
    for pattern, template in _RULES:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


_ROTARY_BUFFER = re.compile(r"^model\.layers\.\d+\.attn\.rotary\.inv_freq$")


def _check_inv_freq(key: str, value: torch.Tensor, head_dim: int, config) -> None:
    """A saved rotary `inv_freq` is consumed by checking it is the table ours computes (base `rope_theta`)."""
    theta = getattr(config, "rope_theta", 10000.0)
    ours = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if not isinstance(config, RetNetConfig) or value.shape != ours.shape or not torch.allclose(value.float(), ours):
        raise ValueError(f"fla tensor {key!r} is not the rotary table of base {theta} over {head_dim} dims ours uses.")


def _repeat_kv(weight: torch.Tensor, head_size: int, groups: int) -> torch.Tensor:
    """Repeat each of the kv heads (rows of `head_size`) `groups` times in place: fla's `repeat(... h d -> (h g) d)`."""
    if groups == 1:
        return weight
    rows = weight.shape[0]
    blocks = weight.reshape(rows // head_size, head_size, *weight.shape[1:])
    return blocks.repeat_interleave(groups, dim=0).reshape(rows * groups, *weight.shape[1:])


def convert_fla_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    fla_config,
    config: RetNetConfig | GatedRetentionConfig,
    require_lm_head: bool = True,
) -> dict[str, torch.Tensor]:
    """fla's RetNet/GLA causal-LM state dict -> our causal-LM state dict (`KEY_TABLE`), every tensor used once.

    Raises naming the fla tensors no rule consumes, the tensors of ours nothing fills, and any shape mismatch.
    `require_lm_head=False` accepts a backbone state dict without `lm_head.weight` (for heads that have none).
    """
    cfg = _fla_dict(fla_config)
    state = _strip_prefix(state_dict)
    heads = config.num_heads
    groups = heads // (cfg.get("num_kv_heads") or heads)
    head_k, head_v = config.head_dim, (config.hidden_size // heads) * config.value_factor
    out: dict[str, torch.Tensor] = {}
    conv_parts: dict[str, dict[str, torch.Tensor]] = {}
    leftovers, seen_from = [], {}
    for key, value in state.items():
        if _ROTARY_BUFFER.match(key):  # older saves keep RotaryEmbedding.inv_freq: ours computes the same table
            _check_inv_freq(key, value, head_k, config)
            continue
        target = fla_key_to_hfx(key)
        if target is None:
            leftovers.append(key)
            continue
        name = key.rsplit(".", 2)[-2] if key.endswith(".weight") or key.endswith(".bias") else key
        if name in ("k_proj", "k_conv1d") or key.endswith("gk_proj.1.weight") or key.endswith("gk_proj.1.bias"):
            value = _repeat_kv(value, head_k, groups)
        elif name in ("v_proj", "v_conv1d"):
            value = _repeat_kv(value, head_v, groups)
        if name.endswith("_conv1d"):
            conv_parts.setdefault(target, {})[name[0]] = value
            continue
        if target in out:
            raise ValueError(f"fla tensors {seen_from[target]!r} and {key!r} both map to {target!r}.")
        out[target], seen_from[target] = value, key
    for target, parts in conv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{target!r} needs fla's q_conv1d, k_conv1d and v_conv1d; got only {sorted(parts)}.")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if leftovers:
        raise ValueError(f"fla tensors with no counterpart in {type(config).__name__} (not consumed): {leftovers}")

    expected = _expected_shapes(config)
    if not require_lm_head and "lm_head.weight" not in out:
        expected.pop("lm_head.weight", None)
    if config.tie_word_embeddings and "lm_head.weight" in out:
        if not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"]):
            raise ValueError(
                "`tie_word_embeddings=True` but fla's lm_head.weight differs from model.embeddings.weight."
            )
        del out["lm_head.weight"]
    if not cfg.get("elementwise_affine", True):  # fla's g_norm has no weight: ours is exact with ones
        for key, shape in expected.items():
            if key.endswith("mixer.g_norm.weight") and key not in out:
                out[key] = torch.ones(shape, dtype=out["model.embed_tokens.weight"].dtype)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    wrong = {
        k: (tuple(out[k].shape), expected[k]) for k in set(out) & set(expected) if tuple(out[k].shape) != expected[k]
    }
    if missing or extra or wrong:
        raise ValueError(
            f"fla state dict does not fit {type(config).__name__}: missing {missing}, unexpected {extra}, "
            f"shape mismatches (fla, ours) {wrong}"
        )
    return out


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of our causal LM for `config` (built on the meta device: no memory, no init)."""
    causal_lm = _FAMILIES[_family_of(config)][1]["AutoModelForCausalLM"]
    causal = copy.deepcopy(config)
    causal.bidirectional = False  # the shapes do not depend on it; the causal-LM head refuses a bidirectional config
    with torch.device("meta"):
        model = causal_lm(causal)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _family_of(config) -> str:
    return "retnet" if isinstance(config, RetNetConfig) else "gla"


def load_fla_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An fla checkpoint folder's tensors (`*.safetensors`, sharded or not; pickle files are refused) and config."""
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} has no config.json: pass a folder saved by fla's save_pretrained.")
    with open(config_path) as f:
        config = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder!r} has no *.safetensors weights; from_fla reads safetensors only (never pickle). Re-save the "
            "fla model with `save_pretrained(..., safe_serialization=True)`."
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state, config


def _resolve_head(head, family: str) -> type:
    classes = _FAMILIES[family][1]
    if isinstance(head, str):
        auto_name = _HEAD_ALIASES.get(head, head)
    elif isinstance(head, type) and head in classes.values():
        return head
    else:
        auto_name = getattr(head, "__name__", repr(head))
    if auto_name == "AutoModelForSeq2SeqLM":
        raise ValueError(
            "from_fla does not build the seq2seq head (its encoder/decoder stacks and cross-attention have no fla "
            "weights): import the causal LM and warm-start the seq2seq model from it."
        )
    if auto_name not in classes:
        options = sorted(_HEAD_ALIASES) + sorted(classes)
        raise ValueError(f"`head={head!r}` is not a head of {family}; pick one of {options} or one of our classes.")
    return classes[auto_name]


def from_fla(
    folder_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    config=None,
    *,
    head: str | type = "causal_lm",
    dtype: torch.dtype | None = None,
    **config_overrides,
):
    """Our model with the weights of an fla RetNet or GLA checkpoint, in any head (`AutoModelFor...` semantics).

    `folder_or_state_dict`: an fla folder (`config.json` + safetensors) or a state dict of fla's
    `RetNetForCausalLM`/`GLAForCausalLM` (or bare model), then with `config` (fla's config object or dict; for a
    folder it overrides config.json). `head`: `"causal_lm"` (default), `"model"`, `"masked_lm"`,
    `"sequence_classification"`, `"token_classification"`, `"question_answering"`, a transformers Auto class or one
    of our classes; non-LM heads are freshly initialised on top of the imported backbone. `dtype`: default the
    checkpoint's. `config_overrides`: fields that leave the weights alone (`forward_mode`, `num_labels`, ...).
    """
    if isinstance(folder_or_state_dict, (str, os.PathLike)):
        state, folder_config = load_fla_folder(folder_or_state_dict)
        config = folder_config if config is None else config
    elif isinstance(folder_or_state_dict, Mapping):
        state = dict(folder_or_state_dict)
    else:
        raise TypeError(
            f"expected an fla checkpoint folder or state dict, got {type(folder_or_state_dict).__name__} "
            "(for a live fla model pass `model.state_dict()` and `model.config`)."
        )
    fla_cfg = _fla_dict(config)
    state = _strip_prefix(state)
    low_rank = state.get("model.layers.0.attn.gk_proj.0.weight")
    ours = fla_config_to_hfx(
        fla_cfg, gate_low_rank_dim=None if low_rank is None else low_rank.shape[0], **config_overrides
    )
    cls = _resolve_head(head, fla_cfg["model_type"])
    with torch.device("meta"):
        own = cls(ours).state_dict()
    bare = not any(k.startswith("model.") for k in own)  # the backbone itself: our keys without `model.`
    wanted = {("model." + k if bare else k) for k in own}
    # a bare fla backbone state dict (no lm_head) serves every head that has no untied LM head of its own
    needs_lm_head = "lm_head.weight" in wanted and not ours.tie_word_embeddings
    converted = convert_fla_state_dict(state, fla_cfg, ours, require_lm_head=needs_lm_head)
    if dtype is None:
        dtype = converted["model.embed_tokens.weight"].dtype
    strays = sorted(k for k in converted if k not in wanted and not k.startswith("lm_head."))
    if strays:
        raise ValueError(f"{cls.__name__} has no place for imported tensors {strays}.")
    converted = {k: v for k, v in converted.items() if k in wanted}  # a non-LM head drops lm_head, gets its own
    model = cls.from_pretrained(None, config=ours, state_dict=converted, dtype=dtype)
    loaded = model.state_dict()
    unset = [k for k, v in converted.items() if not torch.equal(loaded[k[len("model.") :] if bare else k], v.to(dtype))]
    if unset:
        raise ValueError(f"loading into {cls.__name__} did not set {unset}")
    return model.eval()
