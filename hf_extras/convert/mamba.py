"""Import transformers' `MambaForCausalLM` into `HfxMambaForCausalLM` (identical logits), and export back.

The mixer's parameters have transformers' names and shapes, so the conversion is a pure key rename (one table,
`KEY_TABLE`: one to one, no reshapes; `backbone.embeddings` -> `model.embed_tokens`, `backbone.layers.N.norm` ->
`model.layers.N.mixer_norm`, `backbone.norm_f` -> `model.norm`, mixer parameters unchanged) plus a config mapping.

Once imported, a Mamba checkpoint gets every hf_extras head (classification, token classification, QA, masked LM
with a bidirectional scan) and PEFT:

    >>> from hf_extras import HfxMambaForSequenceClassification
    >>> from hf_extras.convert import export_to_transformers_mamba, import_transformers_mamba
    >>> model = import_transformers_mamba("path/to/mamba-130m-hf")          # or a MambaForCausalLM object
    >>> model.save_pretrained("mamba-130m-hfx")
    >>> clf = HfxMambaForSequenceClassification.from_pretrained("mamba-130m-hfx", num_labels=2)
    >>> back = export_to_transformers_mamba(model)                          # a MambaForCausalLM again
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ..models.configuration_mamba import HfxMambaConfig
from ..models.modeling_mamba import HfxMambaForCausalLM

__all__ = [
    "MAMBA_MIXER_PARAMS",
    "KEY_TABLE",
    "mamba_key_to_hfx",
    "hfx_key_to_mamba",
    "hfx_config_from_mamba",
    "mamba_config_from_hfx",
    "mamba_state_dict_to_hfx",
    "hfx_state_dict_to_mamba",
    "import_transformers_mamba",
    "export_to_transformers_mamba",
]

MAMBA_MIXER_PARAMS = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
    "out_proj.bias",
)

# MambaConfig field -> HfxMambaConfig field (same meaning)
_SAME_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "state_size",
    "expand",
    "conv_kernel",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "initializer_range",
    "residual_in_fp32",
    "time_step_rank",
    "time_step_scale",
    "time_step_min",
    "time_step_max",
    "time_step_init_scheme",
    "time_step_floor",
    "rescale_prenorm_residual",
    "use_cache",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)

# the one key-rename table, (transformers' MambaForCausalLM, HfxMambaForCausalLM); {layer} is a block index, {param}
# a mixer parameter (MAMBA_MIXER_PARAMS). Both directions are built from it.
KEY_TABLE = (
    ("backbone.embeddings.weight", "model.embed_tokens.weight"),
    ("backbone.layers.{layer}.norm.weight", "model.layers.{layer}.mixer_norm.weight"),
    ("backbone.layers.{layer}.mixer.{param}", "model.layers.{layer}.mixer.{param}"),
    ("backbone.norm_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)


def rename_rules(mixer_params) -> tuple[list, list]:
    """Both directions of `KEY_TABLE` as regex rules, for a mixer with parameters `mixer_params` (Mamba-1 and Mamba-2
    share the table; only the mixer's parameter names differ): `(transformers -> ours, ours -> transformers)`."""
    params = "|".join(map(re.escape, mixer_params))

    def pattern(template: str) -> re.Pattern:
        body = (
            re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{param\}", rf"(?P<param>{params})")
        )
        return re.compile(f"^{body}$")

    to_hfx = [(pattern(theirs), ours) for theirs, ours in KEY_TABLE]
    to_hfx.append((re.compile(r"^backbone\.embedding\.weight$"), "model.embed_tokens.weight"))  # older checkpoints
    return to_hfx, [(pattern(ours), theirs) for theirs, ours in KEY_TABLE]


_TO_HFX, _TO_MAMBA = rename_rules(MAMBA_MIXER_PARAMS)


def rename_key(key: str, rules, what: str) -> str:
    """`key` renamed by the first matching rule of `rules` (from `rename_rules`), or a KeyError naming `what`."""
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    raise KeyError(f"{key!r} is not a parameter of {what}; is this the right model?")


def mamba_key_to_hfx(key: str) -> str:
    """A transformers `MambaForCausalLM` state-dict key -> the `HfxMambaForCausalLM` key."""
    return rename_key(key, _TO_HFX, "transformers' MambaForCausalLM")


def hfx_key_to_mamba(key: str) -> str:
    """An `HfxMambaForCausalLM` state-dict key -> the transformers `MambaForCausalLM` key."""
    return rename_key(key, _TO_MAMBA, "an HfxMambaForCausalLM with ffn_type='none' and norm_type='rmsnorm'")


def hfx_config_from_mamba(mamba_config, **overrides) -> HfxMambaConfig:
    """The `HfxMambaConfig` of a transformers `MambaConfig` (or its dict); `overrides` are set on top."""
    src = mamba_config if isinstance(mamba_config, Mapping) else mamba_config.to_dict()
    if src.get("model_type", "mamba") != "mamba":
        raise ValueError(
            f"expected a transformers MambaConfig (model_type 'mamba'), got model_type {src['model_type']!r}"
        )
    kwargs = {name: src[name] for name in _SAME_FIELDS if name in src}
    if "layer_norm_epsilon" in src:
        kwargs["norm_eps"] = float(src["layer_norm_epsilon"])
    for name in ("initializer_range", "time_step_scale", "time_step_min", "time_step_max", "time_step_floor"):
        if name in kwargs:  # @strict refuses an int for a float field
            kwargs[name] = float(kwargs[name])
    expand, hidden = kwargs.get("expand", 2), kwargs.get("hidden_size", 768)
    if src.get("intermediate_size") not in (None, expand * hidden):
        raise ValueError(
            f"MambaConfig.intermediate_size ({src['intermediate_size']}) is not expand * hidden_size "
            f"({expand} * {hidden}); HfxMambaConfig derives the mixer width from `expand`."
        )
    kwargs.update(ffn_type="none", norm_type="rmsnorm", num_heads=1, bidirectional=False)
    kwargs.update(overrides)
    return HfxMambaConfig(**kwargs)


def mamba_config_from_hfx(config: HfxMambaConfig):
    """The transformers `MambaConfig` of an `HfxMambaConfig` (which must be a plain causal Mamba stack)."""
    from transformers import MambaConfig

    check_exportable(config, "Mamba")
    kwargs = {name: getattr(config, name) for name in _SAME_FIELDS}
    kwargs["layer_norm_epsilon"] = config.norm_eps
    return MambaConfig(**kwargs)


def mamba_state_dict_to_hfx(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `MambaForCausalLM` (or `MambaModel`, keys without `backbone.`) state dict; tensors are not copied."""
    return state_dict_to_hfx(state_dict, mamba_key_to_hfx)


def hfx_state_dict_to_mamba(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `HfxMambaForCausalLM` state dict to transformers' `MambaForCausalLM` keys; tensors are not copied."""
    return {hfx_key_to_mamba(key): value for key, value in state_dict.items()}


def import_transformers_mamba(source, dtype: torch.dtype | None = None, **config_overrides) -> HfxMambaForCausalLM:
    """`HfxMambaForCausalLM` with the weights of a transformers `MambaForCausalLM` (an object, or a saved folder).

    The result gives the same logits (to float rounding of the scan) and keeps the source's dtype unless `dtype` is
    given. `config_overrides` set `HfxMambaConfig` fields that do not change the weights (e.g. `forward_mode`,
    `chunk_size`).
    """
    from transformers import MambaForCausalLM

    return import_model(
        source,
        MambaForCausalLM,
        HfxMambaForCausalLM,
        hfx_config_from_mamba,
        mamba_state_dict_to_hfx,
        dtype,
        config_overrides,
    )


def export_to_transformers_mamba(model: HfxMambaForCausalLM, dtype: torch.dtype | None = None):
    """A transformers `MambaForCausalLM` with the weights of an `HfxMambaForCausalLM` (inverse of the import)."""
    from transformers import MambaForCausalLM

    return export_model(
        model, HfxMambaForCausalLM, MambaForCausalLM, mamba_config_from_hfx, hfx_state_dict_to_mamba, dtype
    )


def check_exportable(config, what: str) -> None:
    """Refuse to export a config transformers' `{what}ForCausalLM` cannot express (an FFN, other norms, ...)."""
    problems = []
    if config.ffn_type != "none":
        problems.append(f"ffn_type={config.ffn_type!r} (transformers' {what} blocks have no FFN)")
    if config.norm_type != "rmsnorm":
        problems.append(f"norm_type={config.norm_type!r} (transformers' {what} uses RMSNorm)")
    if config.bidirectional:
        problems.append(f"bidirectional=True (transformers' {what} is causal)")
    if config.use_layer_features:
        problems.append("use_layer_features=True")
    if getattr(config, "is_hybrid", False):
        problems.append("layer_types with attention layers (transformers' model has none)")
    if problems:
        raise ValueError(f"cannot export to transformers' {what}ForCausalLM: " + "; ".join(problems))


def state_dict_to_hfx(state_dict: Mapping[str, torch.Tensor], key_to_hfx) -> dict[str, torch.Tensor]:
    """Rename a transformers `...ForCausalLM` (or bare `...Model`: keys without `backbone.`) state dict with
    `key_to_hfx`; tensors are not copied."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(("backbone.", "lm_head.")):
            key = "backbone." + key  # a bare backbone state dict
        out[key_to_hfx(key)] = value
    return out


def load_transformers_model(source, model_class, dtype):
    """`source` if it is a model, else `model_class.from_pretrained(source)` (a folder or Hub id)."""
    if isinstance(source, (str, os.PathLike)):
        return model_class.from_pretrained(source, dtype=dtype if dtype is not None else "auto")
    if isinstance(source, torch.nn.Module):
        return source
    raise TypeError(
        f"expected a {model_class.__name__}, or a folder / Hub id it was saved to, got {type(source).__name__}"
    )


def load_exact(model: torch.nn.Module, state: Mapping[str, torch.Tensor], tied: bool) -> None:
    """Load `state` into `model`, refusing any missing (except a tied `lm_head.weight`) or unexpected key."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


def import_model(source, their_class, our_class, config_to_ours, state_to_ours, dtype, overrides: dict):
    """Our causal LM with the weights of transformers' `their_class` model `source` (an object, or a saved folder):
    config mapped by `config_to_ours`, keys by `state_to_ours`; keeps the source's dtype unless `dtype` is given."""
    theirs = load_transformers_model(source, their_class, dtype)
    if not hasattr(theirs, "backbone"):
        raise TypeError(
            f"expected a {their_class.__name__} (with `.backbone` and `.lm_head`), got {type(theirs).__name__}"
        )
    config = config_to_ours(theirs.config, **overrides)
    state = state_to_ours(theirs.state_dict())
    src_dtype = next(iter(state.values())).dtype if dtype is None else dtype
    model = our_class(config)
    load_exact(model, state, config.tie_word_embeddings)
    return model.to(src_dtype).train(theirs.training)


def export_model(model, our_class, their_class, config_to_theirs, state_to_theirs, dtype):
    """transformers' `their_class` model with the weights of our `model` (the inverse of `import_model`)."""
    if not isinstance(model, our_class):
        raise TypeError(f"expected an {our_class.__name__}, got {type(model).__name__}")
    config = config_to_theirs(model.config)
    state = state_to_theirs(model.state_dict())
    theirs = their_class(config)
    load_exact(theirs, state, config.tie_word_embeddings)
    target = dtype if dtype is not None else next(iter(state.values())).dtype
    return theirs.to(target).train(model.training)
