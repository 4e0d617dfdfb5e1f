"""Importers and exporters: transformers' Mamba and Qwen3-Next linear layers, timm's MLP-Mixer."""

from .mamba import (
    export_to_transformers_mamba,
    hfx_config_from_mamba,
    hfx_state_dict_to_mamba,
    import_transformers_mamba,
    mamba_config_from_hfx,
    mamba_state_dict_to_hfx,
)
from .qwen3_next import gated_deltanet_config_from_qwen3_next, hfx_layer_to_qwen3_next, qwen3_next_layer_to_hfx
from .timm_mixer import (
    convert_timm_mixer_state_dict,
    load_timm_mixer,
    mlp_mixer_config_from_timm,
    timm_mixer_key_to_hf,
    timm_mixer_shapes,
)

__all__ = [
    "export_to_transformers_mamba",
    "hfx_config_from_mamba",
    "hfx_state_dict_to_mamba",
    "import_transformers_mamba",
    "mamba_config_from_hfx",
    "mamba_state_dict_to_hfx",
    "gated_deltanet_config_from_qwen3_next",
    "qwen3_next_layer_to_hfx",
    "hfx_layer_to_qwen3_next",
    "convert_timm_mixer_state_dict",
    "load_timm_mixer",
    "mlp_mixer_config_from_timm",
    "timm_mixer_key_to_hf",
    "timm_mixer_shapes",
]
