"""Import flash-linear-attention (fla) checkpoints: `from_fla(folder_or_state_dict, config=None, head=...)`.

Four fla families map onto ours: `retnet` -> `hfx_retnet`, `gla` -> `hfx_gated_retention` (`gate="key"`),
`gated_deltanet` -> `hfx_gated_deltanet`, `mamba2` -> `hfx_mamba2`. fla is not needed: a folder is read as
`config.json` plus `*.safetensors` (never pickle), and a state dict comes with fla's config (its config object or
dict). The result is our model in the head you ask for, with the same logits as fla's model; `save_pretrained` of it
loads without fla (and, with `trust_remote_code=True`, without hf_extras):

    >>> from hf_extras.convert import from_fla
    >>> model = from_fla("path/to/gla-340M-15B")                           # AutoModelForCausalLM semantics
    >>> clf = from_fla("path/to/gla-340M-15B", head="sequence_classification", num_labels=2)  # fresh `score` head
    >>> model.save_pretrained("gla-340M-hfx")

Conventions, fla -> ours (every config field either maps exactly, is ignored because it changes no number, or is
refused with a `ConfigError` naming it). Shared by RetNet, GLA and Gated DeltaNet (fla's `FLAModel` layout):

| fla | ours |
| --- | --- |
| MLP `GatedMLP`: `hidden_ratio`, `intermediate_size` (None: 256-rounded `2/3 * ratio * hidden`) | `ffn_type="glu"`, `intermediate_size` computed by fla's rule, `hidden_act="silu"` |
| `hidden_act` = `swish` (MLP and output gates) | SiLU (any other `hidden_act` is refused) |
| `norm_eps` (block, final and output norms), `fuse_norm` (fused or `nn.RMSNorm`: same numbers) | `norm_eps`, `norm_type="rmsnorm"` |
| pre-norm blocks, final norm, untied `lm_head` by default | the same; `tie_word_embeddings` copied (fla's default is False) |
| `pad_token_id=None`, `bos_token_id=1`, `eos_token_id=2` | copied (our defaults differ: 0, 2, 1) |
| `attn`: softmax-attention layers `{layers, num_heads, num_kv_heads, qkv_bias, window_size, rope_theta}` (a dict or a list of them) | `layer_types` (`"full_attention"`, or `"sliding_attention"` with `sliding_window` = `window_size`: both see `window_size` tokens, itself included), `rope_theta`; grouped k/v rows repeated per group (exact). Only where it maps exactly: `num_heads` equal to our family's `num_heads` (ours have `hidden_size / num_heads` per head), no `qkv_bias`, one `window_size` and one `rope_theta` for all specs (RetNet: 10000, the base of its own rotary); else refused naming `attn.<field>` |
| `attnres_block_size` (attention residuals) | refused |
| `attn_mode`, `fuse_swiglu`, `fuse_cross_entropy`, `fuse_linear_cross_entropy`, `use_l2warp`, `max_position_embeddings` | ignored: kernel choice, training loss or table size only |

RetNet and GLA:

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
| `fuse_norm` (fused `g_norm_swish_gate` or `g_norm` + gate) | one `g_norm` RMSNorm then the gate: same numbers, a key rename |
| `elementwise_affine=False` (`g_norm` without weight) | `g_norm.weight` set to ones (exact) |
| GLA `use_short_conv`, `conv_size` (three convs q/k/v, SiLU, no bias) | `use_short_conv`, `conv_size` (one conv over q|k|v, SiLU) |
| RetNet `use_short_conv` | ignored, as fla's `RetNetBlock` ignores it (it builds no conv) |
| `feature_map` | GLA: `None` -> `"identity"`, `"relu"` -> `"relu"`; anything else refused; RetNet: only `None` |
| `num_kv_heads` < `num_heads` (grouped k/v) | k/v (and GLA gate) rows repeated per group: exact, the copies train independently |
| older GLA `share_conv_kernel` with a short conv | refused |
| GLA `use_gk`/`use_gv` (unused by fla's GLA model) | ignored |

Gated DeltaNet (fla's `GatedDeltaNet` layer; q/k L2-normalised with eps 1e-6 and q scaled by `head_dim ** -0.5` in
fla's kernel, as ours; decay `-exp(A_log) * softplus(a_proj(x) + dt_bias)` as ours):

| fla | ours |
| --- | --- |
| `num_heads` (q/k heads), `num_v_heads` (value heads; None: `num_heads`) | `num_key_heads`, `num_heads` (value heads); value head j reads key head `j // (num_v_heads / num_heads)` in both; `num_v_heads` not a multiple of `num_heads` is refused |
| `head_dim` (q/k head width), `expand_v` | `key_head_dim`, `value_head_dim = head_dim * expand_v` (refused unless whole); `hidden_size` need not divide by the heads |
| `use_short_conv`, `conv_size` (three convs q/k/v, SiLU, no bias: the block never passes `conv_bias`) | `use_short_conv`, `conv_size` (one conv over q|k|v, SiLU) |
| `use_short_conv=False`: `silu(q_proj(x))`, ... | `silu_without_conv=True` (ours would otherwise pass the projections on unchanged) |
| `use_gate` (`g_proj` + `FusedRMSNormGated`; False: plain per-head `RMSNorm`) | `use_output_gate` |
| `output_gate_activation` `swish`/`silu`/`sigmoid` | `output_gate_activation` `"silu"`/`"silu"`/`"sigmoid"` |
| `allow_neg_eigval` (`beta = 2 sigmoid(b)`) | `allow_neg_eigval` |

Mamba-2 (fla's `Mamba2`, whose parameters have transformers' names: the import reuses `convert.mamba2`'s key table and
config mapping; fla's `model_type` is `mamba2` like transformers', so a config with transformers' field names
(`layer_norm_epsilon`, `time_step_limit`) is refused and pointed to `import_transformers_mamba2`):

| fla | ours |
| --- | --- |
| `head_dim` (`num_heads = expand * hidden_size / head_dim`) | `num_heads` (ours derives `head_dim`); a saved `num_heads` that disagrees is refused |
| `state_size`, `n_groups`, `expand`, `conv_kernel`, `use_bias`, `use_conv_bias`, `residual_in_fp32`, `rescale_prenorm_residual` | the same names |
| `norm_eps` (block, final and gated norms) | `norm_eps` |
| `dt_min`, `dt_max`, `dt_init_floor`, `dt_limit` | `time_step_min`, `time_step_max`, `time_step_floor`, `time_step_limit` |
| `D_has_hdim` | `D_has_hdim` (D per channel instead of per head) |
| `rmsnorm` (False: `y * silu(z)`, no norm), `norm_before_gate` | `output_norm`, `norm_before_gate` |
| `hidden_act` (after the conv) | `silu`/`swish` -> `"silu"`; others refused (fla's and transformers' activation tables differ) |
| `A_init_range`, `conv_init`, `chunk_size`, `fuse_norm`, `fuse_cross_entropy`, `fuse_linear_cross_entropy`, `use_l2warp` | ignored: initialisation, kernel choice or training loss only (fla's Mamba-2 block uses its fused RMSNorm either way) |

Key tables (`KEY_TABLE[model_type]`, fla -> ours); `{i}` is a block index, every fla tensor is consumed exactly once.
RetNet, GLA and Gated DeltaNet share the `FLAModel` rows (a hybrid's attention layers use only these):

    model.embeddings.weight                    -> model.embed_tokens.weight
    model.layers.{i}.attn_norm.weight          -> model.layers.{i}.mixer_norm.weight
    model.layers.{i}.attn.{q,k,v,o}_proj.weight -> model.layers.{i}.mixer.{q,k,v,o}_proj.weight
                                                  (RetNet/GLA grouped kv heads and attention layers' kv heads repeated)
    model.layers.{i}.mlp_norm.weight           -> model.layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight -> model.layers.{i}.ffn.{gate,up,down}_proj.weight
    model.norm.weight                          -> model.norm.weight
    lm_head.weight                             -> lm_head.weight   (with tied embeddings: must equal them, dropped)
    model.layers.{i}.attn.rotary.inv_freq      -> none: checked to be the table ours computes (older saves; RetNet
                                                  and attention layers)

RetNet and GLA add:

    model.layers.{i}.attn.g_proj.weight        -> model.layers.{i}.mixer.g_proj.weight
    model.layers.{i}.attn.g_norm_swish_gate.weight | attn.g_norm.weight -> model.layers.{i}.mixer.g_norm.weight
    model.layers.{i}.attn.gk_proj.0.weight     -> model.layers.{i}.mixer.gk_proj.0.weight
    model.layers.{i}.attn.gk_proj.1.{weight,bias} -> model.layers.{i}.mixer.gk_proj.1.{weight,bias} (kv heads repeated)
    model.layers.{i}.attn.{q,k,v}_conv1d.weight -> model.layers.{i}.mixer.conv1d.weight (concatenated q|k|v)

Gated DeltaNet adds (no reshapes: our mixer groups heads as fla's does):

    model.layers.{i}.attn.{g,a,b}_proj.weight  -> model.layers.{i}.mixer.{g,a,b}_proj.weight
    model.layers.{i}.attn.{A_log,dt_bias}      -> model.layers.{i}.mixer.{A_log,dt_bias}
    model.layers.{i}.attn.o_norm.weight        -> model.layers.{i}.mixer.o_norm.weight
    model.layers.{i}.attn.{q,k,v}_conv1d.weight -> model.layers.{i}.mixer.conv1d.weight (concatenated q|k|v)

Mamba-2 (`convert.mamba2.KEY_TABLE`; `{param}` is one of `MAMBA2_MIXER_PARAMS`: `in_proj`, `conv1d`, `dt_bias`,
`A_log`, `D`, `norm.weight`, `out_proj`):

    backbone.embeddings.weight (older: backbone.embedding.weight) -> model.embed_tokens.weight
    backbone.layers.{i}.norm.weight            -> model.layers.{i}.mixer_norm.weight
    backbone.layers.{i}.mixer.{param}          -> model.layers.{i}.mixer.{param}
    backbone.norm_f.weight                     -> model.norm.weight
    lm_head.weight                             -> lm_head.weight

A bare backbone state dict (keys without `model.`, or `backbone.` for Mamba-2) is accepted too.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError
from ..models.configuration_gated_deltanet import GatedDeltaNetConfig
from ..models.configuration_gated_retention import GatedRetentionConfig
from ..models.configuration_mamba2 import HfxMamba2Config
from ..models.configuration_retnet import RetNetConfig
from ..models.hybrid import attention_head_dim
from ..models.modeling_gated_deltanet import AUTO_CLASSES as GATED_DELTANET_CLASSES
from ..models.modeling_gated_retention import AUTO_CLASSES as GATED_RETENTION_CLASSES
from ..models.modeling_mamba2 import AUTO_CLASSES as MAMBA2_CLASSES
from ..models.modeling_retnet import AUTO_CLASSES as RETNET_CLASSES
from .linearize import repeat_kv_rows
from .mamba2 import KEY_TABLE as MAMBA2_KEY_TABLE
from .mamba2 import MAMBA2_SAME_FIELDS, hfx_config_from_mamba2, mamba2_key_to_hfx

__all__ = ["KEY_TABLE", "fla_key_to_hfx", "fla_config_to_hfx", "convert_fla_state_dict", "load_fla_folder", "from_fla"]

# every fla model of the `FLAModel` layout (RetNet, GLA, Gated DeltaNet); a hybrid's attention layers use only these
_FLA_MODEL_ROWS = (
    ("model.embeddings.weight", "model.embed_tokens.weight"),
    ("model.layers.{i}.attn_norm.weight", "model.layers.{i}.mixer_norm.weight"),
    ("model.layers.{i}.attn.q_proj.weight", "model.layers.{i}.mixer.q_proj.weight"),
    ("model.layers.{i}.attn.k_proj.weight", "model.layers.{i}.mixer.k_proj.weight"),
    ("model.layers.{i}.attn.v_proj.weight", "model.layers.{i}.mixer.v_proj.weight"),
    ("model.layers.{i}.attn.o_proj.weight", "model.layers.{i}.mixer.o_proj.weight"),
    ("model.layers.{i}.mlp_norm.weight", "model.layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.ffn.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.ffn.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.ffn.down_proj.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_SHORT_CONV_ROWS = (  # fla's three depthwise convs, concatenated q|k|v into our one
    ("model.layers.{i}.attn.q_conv1d.weight", "model.layers.{i}.mixer.conv1d.weight"),
    ("model.layers.{i}.attn.k_conv1d.weight", "model.layers.{i}.mixer.conv1d.weight"),
    ("model.layers.{i}.attn.v_conv1d.weight", "model.layers.{i}.mixer.conv1d.weight"),
)
_RETENTION_ROWS = (  # RetNet and GLA (one table, as fla's two layers share these names)
    ("model.layers.{i}.attn.g_proj.weight", "model.layers.{i}.mixer.g_proj.weight"),
    ("model.layers.{i}.attn.g_norm_swish_gate.weight", "model.layers.{i}.mixer.g_norm.weight"),
    ("model.layers.{i}.attn.g_norm.weight", "model.layers.{i}.mixer.g_norm.weight"),
    ("model.layers.{i}.attn.gk_proj.0.weight", "model.layers.{i}.mixer.gk_proj.0.weight"),
    ("model.layers.{i}.attn.gk_proj.1.weight", "model.layers.{i}.mixer.gk_proj.1.weight"),
    ("model.layers.{i}.attn.gk_proj.1.bias", "model.layers.{i}.mixer.gk_proj.1.bias"),
) + _SHORT_CONV_ROWS
_GATED_DELTANET_ROWS = (
    ("model.layers.{i}.attn.g_proj.weight", "model.layers.{i}.mixer.g_proj.weight"),
    ("model.layers.{i}.attn.a_proj.weight", "model.layers.{i}.mixer.a_proj.weight"),
    ("model.layers.{i}.attn.b_proj.weight", "model.layers.{i}.mixer.b_proj.weight"),
    ("model.layers.{i}.attn.A_log", "model.layers.{i}.mixer.A_log"),
    ("model.layers.{i}.attn.dt_bias", "model.layers.{i}.mixer.dt_bias"),
    ("model.layers.{i}.attn.o_norm.weight", "model.layers.{i}.mixer.o_norm.weight"),
) + _SHORT_CONV_ROWS
# fla model_type -> (fla key, our key) rows; Mamba-2's is transformers' Mamba-2 table (`{layer}`, `{param}`)
KEY_TABLE: dict[str, tuple[tuple[str, str], ...]] = {
    "retnet": _FLA_MODEL_ROWS + _RETENTION_ROWS,
    "gla": _FLA_MODEL_ROWS + _RETENTION_ROWS,
    "gated_deltanet": _FLA_MODEL_ROWS + _GATED_DELTANET_ROWS,
    "mamba2": MAMBA2_KEY_TABLE,
}
_RULES = {
    family: [(re.compile("^" + re.escape(fla).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), ours) for fla, ours in rows]
    for family, rows in KEY_TABLE.items()
    if family != "mamba2"  # renamed by `convert.mamba2.mamba2_key_to_hfx`
}

_FLA_MODEL_DEFAULTS = dict(
    num_hidden_layers=24, hidden_ratio=4, intermediate_size=None, hidden_act="swish", norm_eps=1e-6, attn=None,
    use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    initializer_range=0.02, vocab_size=32000, attnres_block_size=None,
)  # fmt: skip
# fla 0.6's config defaults (a config.json may omit fields that equal them)
_FLA_DEFAULTS: dict[str, dict[str, Any]] = {
    "retnet": dict(
        _FLA_MODEL_DEFAULTS, hidden_size=2048, expand_k=1.0, expand_v=2.0, hidden_ratio=2, num_heads=8,
        num_kv_heads=None, feature_map=None, use_output_gate=True, elementwise_affine=True,
    ),
    "gla": dict(
        _FLA_MODEL_DEFAULTS, hidden_size=2048, expand_k=0.5, expand_v=1.0, num_heads=4, num_kv_heads=None,
        feature_map=None, use_short_conv=False, conv_size=4, use_output_gate=True, clamp_min=None,
        elementwise_affine=True,
    ),
    "gated_deltanet": dict(
        _FLA_MODEL_DEFAULTS, hidden_size=2048, expand_v=2.0, use_gate=True, use_short_conv=True,
        allow_neg_eigval=False, conv_size=4, head_dim=256, num_heads=6, num_v_heads=None, num_hidden_layers=21,
        output_gate_activation="swish",
    ),
    "mamba2": dict(
        head_dim=64, vocab_size=32000, hidden_size=2048, state_size=128, num_hidden_layers=48, norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, expand=2, conv_kernel=4, n_groups=1, use_bias=False,
        use_conv_bias=True, D_has_hdim=False, hidden_act="silu", initializer_range=0.02, residual_in_fp32=True,
        dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), rescale_prenorm_residual=True,
        use_cache=True, rmsnorm=True, norm_before_gate=False, tie_word_embeddings=False,
    ),
}  # fmt: skip
_FAMILIES = {
    "retnet": (RetNetConfig, RETNET_CLASSES),
    "gla": (GatedRetentionConfig, GATED_RETENTION_CLASSES),
    "gated_deltanet": (GatedDeltaNetConfig, GATED_DELTANET_CLASSES),
    "mamba2": (HfxMamba2Config, MAMBA2_CLASSES),
}
_FAMILY_NAMES = "fla's RetNet, GLA, Gated DeltaNet and Mamba-2"
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
_ATTN_DEFAULTS = dict(num_kv_heads=None, qkv_bias=False, window_size=None, rope_theta=10000.0)  # fla's AttentionSpec
_TRANSFORMERS_MAMBA2_FIELDS = ("layer_norm_epsilon", "time_step_limit", "time_step_min")


def _fla_dict(config) -> dict[str, Any]:
    """fla's config (object or dict) as a dict with fla's defaults filled in; checks the model type."""
    if config is None:
        raise ConfigError(
            "`config` is required with a state dict: pass fla's config (RetNetConfig, GLAConfig, GatedDeltaNetConfig, "
            "Mamba2Config) or its dict."
        )
    src = dict(config) if isinstance(config, Mapping) else config.to_dict()
    model_type = src.get("model_type")
    if model_type not in _FLA_DEFAULTS:
        raise ConfigError(
            f"fla config has model_type {model_type!r}; from_fla imports {sorted(_FLA_DEFAULTS)} "
            f"({_FAMILY_NAMES}). Other fla families have no hf_extras counterpart yet."
        )
    if model_type == "mamba2" and any(field in src for field in _TRANSFORMERS_MAMBA2_FIELDS):
        raise ConfigError(
            "this `mamba2` config has transformers' field names (`layer_norm_epsilon`, `time_step_limit`): it is "
            "transformers' Mamba2Config, not fla's. Import it with hf_extras.convert.import_transformers_mamba2."
        )
    if "attn" not in src and hasattr(config, "attn"):  # fla keeps `attn` behind a property
        src["attn"] = config.attn
    return {**_FLA_DEFAULTS[model_type], **src}


def _refuse(field: str, value, why: str):
    raise ConfigError(f"fla config field `{field}={value!r}` has no hf_extras counterpart: {why}")


def _fla_intermediate_size(cfg: Mapping[str, Any]) -> int:
    """fla GatedMLP's width: `intermediate_size`, or `2/3 * hidden_ratio * hidden` rounded up to a multiple of 256."""
    if cfg.get("intermediate_size") is not None:
        return int(cfg["intermediate_size"])
    ratio = cfg.get("hidden_ratio") or 4
    width = int(cfg["hidden_size"] * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


def _fla_model_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What RetNet, GLA and Gated DeltaNet share (fla's `FLAModel`): embeddings, pre-norm blocks with fla's SwiGLU
    `GatedMLP`, the final norm and the LM head."""
    if cfg.get("hidden_act") not in ("swish", "silu"):
        _refuse("hidden_act", cfg.get("hidden_act"), "only swish (SiLU) gates and SwiGLU MLPs map exactly.")
    return dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
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


def _retention_kwargs(cfg: Mapping[str, Any], gate_low_rank_dim: int | None) -> dict[str, Any]:
    """RetNet's and GLA's mixer fields."""
    family = cfg["model_type"]
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
        num_heads=heads,
        key_factor=float(cfg["expand_k"]),
        value_factor=int(expand_v),
        use_output_gate=bool(cfg["use_output_gate"]),
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
    return kwargs


def _gated_deltanet_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Gated DeltaNet's mixer fields: fla's q/k heads are our key heads, its value heads our `num_heads`."""
    key_heads = int(cfg["num_heads"])
    value_heads = int(cfg.get("num_v_heads") or key_heads)
    if value_heads % key_heads:
        _refuse(
            "num_v_heads",
            value_heads,
            f"it must be a multiple of num_heads={key_heads}: each q/k head serves num_v_heads / num_heads value "
            "heads (fla's kernels refuse it too).",
        )
    head_k = int(cfg["head_dim"])
    head_v = head_k * float(cfg["expand_v"])
    if head_v != int(head_v):
        _refuse("expand_v", cfg["expand_v"], f"head_dim * expand_v = {head_v} is not a whole value head width.")
    activation = cfg.get("output_gate_activation") or "swish"
    if activation not in ("swish", "silu", "sigmoid"):
        _refuse("output_gate_activation", activation, "our output gate is SiLU or sigmoid.")
    return dict(
        num_heads=value_heads,
        num_key_heads=key_heads,
        key_head_dim=head_k,
        value_head_dim=int(head_v),
        gate="head",
        use_short_conv=bool(cfg["use_short_conv"]),
        conv_size=int(cfg["conv_size"]),
        silu_without_conv=True,  # fla's layer applies SiLU to q, k, v with or without its short convs
        use_output_gate=bool(cfg["use_gate"]),
        output_gate_activation="sigmoid" if activation == "sigmoid" else "silu",
        allow_neg_eigval=bool(cfg["allow_neg_eigval"]),
    )


def _attention_specs(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """fla's `attn` (None, a dict, or a list of dicts) as a list of specs with fla's defaults filled in."""
    attn = cfg.get("attn")
    if attn is None:
        return []
    specs = []
    for spec in [attn] if isinstance(attn, Mapping) else list(attn):
        if not isinstance(spec, Mapping) or "layers" not in spec or "num_heads" not in spec:
            _refuse("attn", attn, "each attention spec is a dict with at least `layers` and `num_heads`.")
        unknown = sorted(set(spec) - {"layers", "num_heads", *_ATTN_DEFAULTS})
        if unknown:
            _refuse(
                f"attn.{unknown[0]}",
                spec[unknown[0]],
                f"fla's attention spec has only {['layers', 'num_heads', *_ATTN_DEFAULTS]}.",
            )
        full = {**_ATTN_DEFAULTS, **spec}
        full["num_kv_heads"] = full["num_kv_heads"] or full["num_heads"]
        specs.append(full)
    return specs


def _hybrid_kwargs(cfg: Mapping[str, Any], heads: int) -> dict[str, Any]:
    """`layer_types`, `sliding_window` and `rope_theta` for fla's `attn` layers, where they map exactly onto our hybrid
    attention layers (`heads` heads of `hidden_size / heads`, no biases, one window, one rotary base)."""
    specs = _attention_specs(cfg)
    if not specs:
        return {}
    layer_types = ["linear_attention"] * int(cfg["num_hidden_layers"])
    windows, thetas = set(), set()
    for spec in specs:
        if int(spec["num_heads"]) != heads:
            _refuse(
                "attn.num_heads",
                spec["num_heads"],
                f"our hybrid attention layers have the family's num_heads={heads} heads of hidden_size / num_heads "
                "channels; only an `attn` with as many heads maps exactly.",
            )
        if heads % int(spec["num_kv_heads"]):
            _refuse("attn.num_kv_heads", spec["num_kv_heads"], f"num_heads={heads} must be a multiple of it.")
        if spec["qkv_bias"]:
            _refuse("attn.qkv_bias", spec["qkv_bias"], "our hybrid attention layers have no q/k/v biases.")
        if spec["window_size"] is not None:
            windows.add(int(spec["window_size"]))
        thetas.add(float(spec["rope_theta"]))
        for layer in spec["layers"]:
            if not 0 <= layer < len(layer_types) or layer_types[layer] != "linear_attention":
                _refuse("attn.layers", spec["layers"], f"layer {layer} is out of range or named twice.")
            layer_types[layer] = "full_attention" if spec["window_size"] is None else "sliding_attention"
    if len(windows) > 1:
        _refuse("attn.window_size", sorted(windows), "our sliding attention layers share one `sliding_window`.")
    if len(thetas) > 1:
        _refuse("attn.rope_theta", sorted(thetas), "our attention layers share one `rope_theta`.")
    theta = thetas.pop()
    if cfg["model_type"] == "retnet" and theta != 10000.0:
        _refuse("attn.rope_theta", theta, "our RetNet's `rope_theta` also sets its retention rotary (fla's: 10000).")
    return dict(layer_types=layer_types, sliding_window=windows.pop() if windows else None, rope_theta=theta)


# fla Mamba2Config field -> transformers' Mamba2Config field (then `hfx_config_from_mamba2` maps it onto ours)
_MAMBA2_RENAMED = dict(
    norm_eps="layer_norm_epsilon", dt_min="time_step_min", dt_max="time_step_max", dt_init_floor="time_step_floor",
    dt_limit="time_step_limit",
)  # fmt: skip


def _mamba2_config(cfg: Mapping[str, Any], overrides: dict[str, Any]) -> HfxMamba2Config:
    """fla's Mamba-2 config, renamed to transformers' fields and mapped by `convert.mamba2`, plus mamba_ssm's options."""
    if cfg.get("hidden_act") not in ("silu", "swish"):
        why = "only SiLU after the conv maps exactly (fla's and transformers' other activations differ)."
        _refuse("hidden_act", cfg.get("hidden_act"), why)
    width, head_dim = int(cfg["expand"]) * int(cfg["hidden_size"]), int(cfg["head_dim"])
    if width % head_dim:
        _refuse("head_dim", head_dim, f"it must divide expand * hidden_size = {width} (fla's layer refuses it too).")
    heads = width // head_dim
    if cfg.get("num_heads") not in (None, heads):
        _refuse("num_heads", cfg["num_heads"], f"fla's layer needs expand * hidden_size / head_dim = {heads}.")
    theirs = {name: cfg[name] for name in MAMBA2_SAME_FIELDS if name in cfg}  # renamed/derived ones follow
    theirs.update({new: cfg[old] for old, new in _MAMBA2_RENAMED.items()}, num_heads=heads, hidden_act="silu")
    options = dict(
        D_has_hdim=bool(cfg["D_has_hdim"]),
        output_norm=bool(cfg["rmsnorm"]),
        norm_before_gate=bool(cfg["norm_before_gate"]),
    )
    return hfx_config_from_mamba2(theirs, **{**options, **overrides})


def fla_config_to_hfx(config, gate_low_rank_dim: int | None = None, **overrides):
    """Our config for an fla RetNet, GLA, Gated DeltaNet or Mamba-2 config (object or dict); refuses, with a
    `ConfigError` naming the field, the options we have no counterpart for.

    `gate_low_rank_dim` is GLA's gate rank (fla's model always builds 16; `from_fla` reads it off the weights).
    `overrides` set fields that do not change the weights (e.g. `forward_mode`, `num_labels`, `bidirectional`).
    """
    cfg = _fla_dict(config)
    family = cfg["model_type"]
    if cfg.get("attnres_block_size") is not None:
        _refuse("attnres_block_size", cfg["attnres_block_size"], "attention residuals are not an hf_extras block.")
    if family == "mamba2":
        return _mamba2_config(cfg, overrides)
    kwargs = _fla_model_kwargs(cfg)
    if family == "gated_deltanet":
        kwargs.update(_gated_deltanet_kwargs(cfg))
    else:
        kwargs.update(_retention_kwargs(cfg, gate_low_rank_dim))
    kwargs.update(_hybrid_kwargs(cfg, kwargs["num_heads"]))
    kwargs.update(overrides)
    return _FAMILIES[family][0](**kwargs)


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A bare backbone state dict gets the causal LM's prefix (`model.`; fla's Mamba-2: `backbone.`)."""
    prefix = "backbone." if family == "mamba2" else "model."
    if any(key.startswith(prefix) for key in state_dict):
        return dict(state_dict)
    return {key if key.startswith("lm_head.") else prefix + key: value for key, value in state_dict.items()}


def fla_key_to_hfx(key: str, model_type: str = "retnet") -> str | None:
    """Our key for an fla (causal-LM) key of `model_type` by `KEY_TABLE`, or `None` when no rule matches."""
    if model_type not in KEY_TABLE:
        raise ConfigError(f"`model_type={model_type!r}` is not an fla family from_fla imports: {sorted(KEY_TABLE)}.")
    if model_type == "mamba2":
        try:
            return mamba2_key_to_hfx(key)
        except KeyError:
            return None
    for pattern, template in _RULES[model_type]:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


_ROTARY_BUFFER = re.compile(r"^model\.layers\.(?P<i>\d+)\.attn\.rotary\.inv_freq$")
_LAYER_PARAM = re.compile(r"^model\.layers\.(?P<i>\d+)\.attn\.(?P<name>.+)\.(weight|bias)$")


def _block_rotary(layer: int, config) -> tuple[int, float] | None:
    """`(dim, base)` of block `layer`'s rotary table in our model (attention layer or RetNet), or None (no rotary)."""
    kinds = config.resolved_layer_types
    if layer < len(kinds) and kinds[layer] != "linear_attention":
        return attention_head_dim(config), float(config.rope_theta)
    if isinstance(config, RetNetConfig):
        return config.head_dim, float(config.rope_theta)
    return None


def _check_inv_freq(key: str, value: torch.Tensor, rotary: tuple[int, float] | None) -> None:
    """A saved rotary `inv_freq` is consumed by checking it is the table ours computes."""
    if rotary is None:
        raise ValueError(f"fla tensor {key!r} is a rotary table, but that block of ours has no rotary positions.")
    dim, theta = rotary
    ours = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if value.shape != ours.shape or not torch.allclose(value.float(), ours):
        raise ValueError(f"fla tensor {key!r} is not the rotary table of base {theta} over {dim} dims ours uses.")


def _kv_regrouping(cfg: Mapping[str, Any], config) -> list[dict[str, tuple[int, int]]]:
    """Per block: fla module under `attn.` -> `(copies, rows per head)` of the grouped k/v rows ours repeats (the
    arguments of `repeat_kv_rows`).

    RetNet/GLA mixers and the attention layers of a hybrid expand grouped kv heads; Gated DeltaNet groups its heads
    natively (no copies), and Mamba-2's B/C groups are its own (`n_groups`)."""
    attention = {layer: spec for spec in _attention_specs(cfg) for layer in spec["layers"]}
    plan = []
    for layer in range(config.num_hidden_layers):
        if layer in attention:
            heads, kv_heads = int(attention[layer]["num_heads"]), int(attention[layer]["num_kv_heads"])
            head = attention_head_dim(config)  # attn.num_heads == config.num_heads (checked on import)
            plan.append({"k_proj": (heads // kv_heads, head), "v_proj": (heads // kv_heads, head)})
        elif cfg["model_type"] in ("retnet", "gla"):
            heads = config.num_heads
            groups = heads // (cfg.get("num_kv_heads") or heads)
            head_k, head_v = config.head_dim, (config.hidden_size // heads) * config.value_factor
            keys, values = (groups, head_k), (groups, head_v)
            plan.append(dict(k_proj=keys, k_conv1d=keys, v_proj=values, v_conv1d=values, **{"gk_proj.1": keys}))
        else:
            plan.append({})
    return plan


def convert_fla_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    fla_config,
    config,
    require_lm_head: bool = True,
) -> dict[str, torch.Tensor]:
    """fla's causal-LM state dict -> our causal-LM state dict (`KEY_TABLE`), every tensor used once.

    Raises naming the fla tensors no rule consumes, the tensors of ours nothing fills, and any shape mismatch.
    `require_lm_head=False` accepts a backbone state dict without `lm_head.weight` (for heads that have none).
    """
    cfg = _fla_dict(fla_config)
    family = cfg["model_type"]
    state = _strip_prefix(state_dict, family)
    regroup = _kv_regrouping(cfg, config)
    out: dict[str, torch.Tensor] = {}
    conv_parts: dict[str, dict[str, torch.Tensor]] = {}
    leftovers, seen_from = [], {}
    for key, value in state.items():
        rotary = _ROTARY_BUFFER.match(key)
        if rotary:  # older saves keep RotaryEmbedding.inv_freq: ours computes the same table
            _check_inv_freq(key, value, _block_rotary(int(rotary["i"]), config))
            continue
        target = fla_key_to_hfx(key, family)
        if target is None:
            leftovers.append(key)
            continue
        param = _LAYER_PARAM.match(key)
        if param:
            layer, name = int(param["i"]), param["name"]
            if layer < len(regroup) and name in regroup[layer]:
                value = repeat_kv_rows(value, *regroup[layer][name])
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
    causal_lm = next(classes for cls, classes in _FAMILIES.values() if type(config) is cls)["AutoModelForCausalLM"]
    causal = copy.deepcopy(config)
    causal.bidirectional = False  # the shapes do not depend on it; the causal-LM head refuses a bidirectional config
    with torch.device("meta"):
        model = causal_lm(causal)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def load_fla_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An fla checkpoint folder's tensors (`*.safetensors`, sharded or not; pickle files are refused) and config."""
    from safetensors.torch import load_file
    from transformers import PreTrainedConfig

    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} has no config.json: pass a folder saved by fla's save_pretrained.")
    # transformers' own reader: it decodes the `{"__float__": "Infinity"}` it writes for Mamba-2's `dt_limit`
    config = PreTrainedConfig.get_config_dict(folder, local_files_only=True)[0]
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
    """Our model with the weights of an fla RetNet, GLA, Gated DeltaNet or Mamba-2 checkpoint, in any head
    (`AutoModelFor...` semantics).

    `folder_or_state_dict`: an fla folder (`config.json` + safetensors) or a state dict of fla's `...ForCausalLM`
    (or bare model), then with `config` (fla's config object or dict; for a folder it overrides config.json). `head`: `"causal_lm"` (default), `"model"`, `"masked_lm"`,
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
    state = _strip_prefix(state, fla_cfg["model_type"])
    low_rank = next((v for k, v in state.items() if k.endswith(".attn.gk_proj.0.weight")), None)  # GLA's gate rank
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
