"""Importers and exporters: transformers' Mamba, Mamba-2 and Qwen3-Next linear layers, timm's MLP-Mixer,
flash-linear-attention's RetNet, GLA, Gated DeltaNet and Mamba-2; `linearize` turns a pretrained Llama-style Transformer into a linear one."""

from .fla import KEY_TABLE as FLA_KEY_TABLE
from .fla import convert_fla_state_dict, fla_config_to_hfx, fla_key_to_hfx, from_fla, load_fla_folder
from .linearize import LINEARIZE_TARGETS, attention_transfer_loss, kl_to_teacher, linearize, linearized_config
from .mamba import (
    export_to_transformers_mamba,
    hfx_config_from_mamba,
    hfx_state_dict_to_mamba,
    import_transformers_mamba,
    mamba_config_from_hfx,
    mamba_state_dict_to_hfx,
)
from .mamba2 import (
    export_to_transformers_mamba2,
    hfx_config_from_mamba2,
    hfx_state_dict_to_mamba2,
    import_transformers_mamba2,
    mamba2_config_from_hfx,
    mamba2_state_dict_to_hfx,
)
from .qwen3_next import gated_deltanet_config_from_qwen3_next, hfx_layer_to_qwen3_next, qwen3_next_layer_to_hfx
from .timm_mixer import (
    TIMM_MIXER_DATA_CONFIG,
    convert_timm_mixer_state_dict,
    import_timm_mixer,
    load_timm_mixer,
    mlp_mixer_config_from_timm,
    timm_mixer_image_processor,
    timm_mixer_key_to_hf,
    timm_mixer_shapes,
)

__all__ = [
    "FLA_KEY_TABLE",
    "convert_fla_state_dict",
    "fla_config_to_hfx",
    "fla_key_to_hfx",
    "from_fla",
    "load_fla_folder",
    "LINEARIZE_TARGETS",
    "attention_transfer_loss",
    "kl_to_teacher",
    "linearize",
    "linearized_config",
    "export_to_transformers_mamba",
    "hfx_config_from_mamba",
    "hfx_state_dict_to_mamba",
    "import_transformers_mamba",
    "mamba_config_from_hfx",
    "mamba_state_dict_to_hfx",
    "export_to_transformers_mamba2",
    "hfx_config_from_mamba2",
    "hfx_state_dict_to_mamba2",
    "import_transformers_mamba2",
    "mamba2_config_from_hfx",
    "mamba2_state_dict_to_hfx",
    "gated_deltanet_config_from_qwen3_next",
    "qwen3_next_layer_to_hfx",
    "hfx_layer_to_qwen3_next",
    "convert_timm_mixer_state_dict",
    "load_timm_mixer",
    "mlp_mixer_config_from_timm",
    "timm_mixer_key_to_hf",
    "timm_mixer_shapes",
    "TIMM_MIXER_DATA_CONFIG",
    "timm_mixer_image_processor",
    "import_timm_mixer",
]
