"""Import transformers' `Mamba2ForCausalLM` into `HfxMamba2ForCausalLM` (identical logits), and export back.

The mixer's parameters have transformers' names and shapes (and `in_proj`'s output split order `z, xBC, dt`), so the
conversion is a pure key rename (`KEY_TABLE`, the Mamba-1 converter's table: one to one, no reshapes;
`backbone.embeddings` -> `model.embed_tokens`, `backbone.layers.N.norm` -> `model.layers.N.mixer_norm`,
`backbone.norm_f` -> `model.norm`, mixer parameters `MAMBA2_MIXER_PARAMS` unchanged: `in_proj`, `conv1d`, `dt_bias`,
`A_log`, `D`, `norm.weight` (the gated RMS norm), `out_proj`) plus a config mapping.

Config: `Mamba2Config.head_dim` is derived here (`expand * hidden_size / num_heads`), `layer_norm_epsilon` is
`norm_eps`, `time_step_rank` is unused by Mamba-2 and dropped, `chunk_size` is not copied (it does not change the
numbers; ours defaults to 64, faster for the PyTorch form on CPU; pass `chunk_size=...` to override).

Once imported, a Mamba-2 checkpoint gets every hf_extras head (classification, token classification, QA, masked LM
with a bidirectional scan, seq2seq) and PEFT:

    >>> from hf_extras import HfxMamba2ForSequenceClassification
    >>> from hf_extras.convert import export_to_transformers_mamba2, import_transformers_mamba2
    >>> model = import_transformers_mamba2("path/to/mamba2-130m-hf")        # or a Mamba2ForCausalLM object
    >>> model.save_pretrained("mamba2-130m-hfx")
    >>> clf = HfxMamba2ForSequenceClassification.from_pretrained("mamba2-130m-hfx", num_labels=2)
    >>> back = export_to_transformers_mamba2(model)                         # a Mamba2ForCausalLM again
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.configuration_mamba2 import HfxMamba2Config
from ..models.modeling_mamba2 import HfxMamba2ForCausalLM
from .mamba import KEY_TABLE as MAMBA_KEY_TABLE
from .mamba import check_exportable, export_model, import_model, rename_key, rename_rules, state_dict_to_hfx

__all__ = [
    "MAMBA2_MIXER_PARAMS",
    "KEY_TABLE",
    "mamba2_key_to_hfx",
    "hfx_key_to_mamba2",
    "hfx_config_from_mamba2",
    "mamba2_config_from_hfx",
    "mamba2_state_dict_to_hfx",
    "hfx_state_dict_to_mamba2",
    "import_transformers_mamba2",
    "export_to_transformers_mamba2",
]

MAMBA2_MIXER_PARAMS = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
    "out_proj.bias",
)

# Mamba2Config field -> HfxMamba2Config field (same name, same meaning)
MAMBA2_SAME_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_heads",
    "state_size",
    "n_groups",
    "expand",
    "conv_kernel",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "initializer_range",
    "residual_in_fp32",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
    "time_step_limit",
    "rescale_prenorm_residual",
    "use_cache",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_FLOAT_FIELDS = ("initializer_range", "time_step_min", "time_step_max", "time_step_floor")

# the key-rename table is Mamba-1's (`convert.mamba.KEY_TABLE`: same module names around the mixer); only the mixer's
# parameter list differs. Both directions are built from it.
KEY_TABLE = MAMBA_KEY_TABLE
_TO_HFX, _TO_MAMBA2 = rename_rules(MAMBA2_MIXER_PARAMS)


def mamba2_key_to_hfx(key: str) -> str:
    """A transformers `Mamba2ForCausalLM` state-dict key -> the `HfxMamba2ForCausalLM` key."""
    return rename_key(key, _TO_HFX, "transformers' Mamba2ForCausalLM")


def hfx_key_to_mamba2(key: str) -> str:
    """An `HfxMamba2ForCausalLM` state-dict key -> the transformers `Mamba2ForCausalLM` key."""
    return rename_key(key, _TO_MAMBA2, "an HfxMamba2ForCausalLM with ffn_type='none' and norm_type='rmsnorm'")


def _float_limit(limit) -> list[float]:
    return [float(v) for v in limit]


def hfx_config_from_mamba2(mamba2_config, **overrides) -> HfxMamba2Config:
    """The `HfxMamba2Config` of a transformers `Mamba2Config` (or its dict); `overrides` are set on top."""
    src = mamba2_config if isinstance(mamba2_config, Mapping) else mamba2_config.to_dict()
    if src.get("model_type", "mamba2") != "mamba2":
        raise ValueError(
            f"expected a transformers Mamba2Config (model_type 'mamba2'), got model_type {src['model_type']!r}"
        )
    kwargs = {name: src[name] for name in MAMBA2_SAME_FIELDS if name in src}
    if "layer_norm_epsilon" in src:
        kwargs["norm_eps"] = float(src["layer_norm_epsilon"])
    for name in _FLOAT_FIELDS:
        if name in kwargs:  # @strict refuses an int for a float field
            kwargs[name] = float(kwargs[name])
    if "time_step_limit" in kwargs:
        kwargs["time_step_limit"] = _float_limit(kwargs["time_step_limit"])
    expand, hidden, heads = kwargs.get("expand", 2), kwargs.get("hidden_size", 4096), kwargs.get("num_heads", 128)
    if "head_dim" in src and src["head_dim"] * heads != expand * hidden:
        raise ValueError(
            f"Mamba2Config.head_dim * num_heads ({src['head_dim']} * {heads}) is not expand * hidden_size "
            f"({expand} * {hidden}); HfxMamba2Config derives head_dim from `expand` and `num_heads`."
        )
    kwargs.update(ffn_type="none", norm_type="rmsnorm", bidirectional=False)
    kwargs.update(overrides)
    return HfxMamba2Config(**kwargs)


def mamba2_config_from_hfx(config: HfxMamba2Config):
    """The transformers `Mamba2Config` of an `HfxMamba2Config` (which must be a plain causal Mamba-2 stack)."""
    from transformers import Mamba2Config

    check_exportable(config, "Mamba2")
    options = {"D_has_hdim": False, "output_norm": True, "norm_before_gate": False}  # mamba_ssm's, not transformers'
    changed = {name: getattr(config, name) for name, default in options.items() if getattr(config, name) != default}
    if changed:
        raise ValueError(f"cannot export to transformers' Mamba2ForCausalLM, which has no option for {changed}.")
    kwargs = {name: getattr(config, name) for name in MAMBA2_SAME_FIELDS}
    kwargs["time_step_limit"] = tuple(_float_limit(config.time_step_limit))
    kwargs["layer_norm_epsilon"] = config.norm_eps
    kwargs["head_dim"] = config.head_dim
    return Mamba2Config(**kwargs)


def mamba2_state_dict_to_hfx(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `Mamba2ForCausalLM` (or `Mamba2Model`, keys without `backbone.`) state dict; tensors are not copied."""
    return state_dict_to_hfx(state_dict, mamba2_key_to_hfx)


def hfx_state_dict_to_mamba2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `HfxMamba2ForCausalLM` state dict to transformers' `Mamba2ForCausalLM` keys; tensors are not copied."""
    return {hfx_key_to_mamba2(key): value for key, value in state_dict.items()}


def import_transformers_mamba2(source, dtype: torch.dtype | None = None, **config_overrides) -> HfxMamba2ForCausalLM:
    """`HfxMamba2ForCausalLM` with the weights of a transformers `Mamba2ForCausalLM` (an object, or a saved folder).

    The result gives the same logits (to float rounding of the scan) and keeps the source's dtype unless `dtype` is
    given. `config_overrides` set `HfxMamba2Config` fields that do not change the weights (e.g. `forward_mode`,
    `chunk_size`).
    """
    from transformers import Mamba2ForCausalLM

    return import_model(
        source,
        Mamba2ForCausalLM,
        HfxMamba2ForCausalLM,
        hfx_config_from_mamba2,
        mamba2_state_dict_to_hfx,
        dtype,
        config_overrides,
    )


def export_to_transformers_mamba2(model: HfxMamba2ForCausalLM, dtype: torch.dtype | None = None):
    """A transformers `Mamba2ForCausalLM` with the weights of an `HfxMamba2ForCausalLM` (inverse of the import)."""
    from transformers import Mamba2ForCausalLM

    return export_model(
        model, HfxMamba2ForCausalLM, Mamba2ForCausalLM, mamba2_config_from_hfx, hfx_state_dict_to_mamba2, dtype
    )
