"""Importers from other implementations' checkpoints (transformers Mamba, timm Mixer)."""

from .timm_mixer import convert_timm_mixer_state_dict, load_timm_mixer, mlp_mixer_config_from_timm, timm_mixer_key_to_hf, timm_mixer_shapes
