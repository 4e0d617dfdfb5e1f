"""MLP-Mixer configuration (`model_type="hfx_mlp_mixer"`)."""

# No `from __future__ import annotations` in config files: @strict validates against the real (unstringified) types.
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.utils.type_validators import positive_int_field

from .configuration_common import CommonConfig

# The paper's sizes (Tolstikhin et al. 2021, Table 1): width, depth, token-MLP width, channel-MLP width, patch.
# Parameter counts with a 1,000-class head at 224 px: S/32 19.1M, S/16 18.5M, B/32 60.3M, B/16 59.9M,
# L/32 206.9M, L/16 208.2M (`tests/test_mlp_mixer.py` checks them).
PRESETS: dict[str, dict] = {
    "S/32": dict(hidden_size=512, num_hidden_layers=8, tokens_mlp_dim=256, channels_mlp_dim=2048, patch_size=32),
    "S/16": dict(hidden_size=512, num_hidden_layers=8, tokens_mlp_dim=256, channels_mlp_dim=2048, patch_size=16),
    "B/32": dict(hidden_size=768, num_hidden_layers=12, tokens_mlp_dim=384, channels_mlp_dim=3072, patch_size=32),
    "B/16": dict(hidden_size=768, num_hidden_layers=12, tokens_mlp_dim=384, channels_mlp_dim=3072, patch_size=16),
    "L/32": dict(hidden_size=1024, num_hidden_layers=24, tokens_mlp_dim=512, channels_mlp_dim=4096, patch_size=32),
    "L/16": dict(hidden_size=1024, num_hidden_layers=24, tokens_mlp_dim=512, channels_mlp_dim=4096, patch_size=16),
}


@strict
class MlpMixerConfig(CommonConfig):
    r"""
    MLP-Mixer (Tolstikhin et al. 2021): information is mixed by MLPs only. Each block is
    `x = x + token_mlp(norm1(x)^T)^T; x = x + channel_mlp(norm2(x))`: one MLP across tokens (shared over channels),
    then one across channels (shared over tokens), both with GELU. Weights map one-to-one to timm's `mixer_*`
    models (`hf_extras.convert.convert_timm_mixer_state_dict`).

    Two input modes (`modality`):
      - `"image"`: a per-patch linear embedding (a `patch_size` x `patch_size` conv with stride `patch_size`) turns
        an `image_size` x `image_size` image into `(image_size / patch_size)**2` tokens; the classifier averages
        the tokens (global average pooling) and applies a linear `head`. Patches are always mixed in both
        directions (`bidirectional` does not apply).
      - `"text"`: token embeddings over a fixed window of `max_position_embeddings` positions (the token-mixing MLP
        has one weight per position, so the window is part of the weights; there are no position embeddings).
        Shorter inputs use the first positions of the window; longer inputs raise an error. Padded positions
        are zeroed before every token-mixing MLP, so they never influence real tokens, and real tokens are
        packed to the front of the window first, so left and right padding give the same outputs. With
        `bidirectional=False` (the default, required by `MlpMixerForCausalLM`) the token-mixing MLP is masked
        lower-triangular (MADE-style), so no position sees a later one.

    Args:
        modality (`str`): `"image"` or `"text"`.
        image_size (`int`): height and width of the (square) input image, in pixels.
        patch_size (`int`): side of a square patch; must divide `image_size`.
        num_channels (`int`): input image channels (3 for RGB, 1 for grayscale).
        hidden_size (`int`): channels per token (the paper's `C`).
        num_hidden_layers (`int`): number of Mixer blocks.
        tokens_mlp_dim (`int`): hidden width of the token-mixing MLP (the paper's `D_S`).
        channels_mlp_dim (`int`): hidden width of the channel-mixing MLP (the paper's `D_C`).
        hidden_act (`str`): activation of both MLPs (`"gelu"`, exact erf GELU as in the paper and timm).
        norm_type (`str`): `"layernorm"` (the paper) or `"dyt"` (Dynamic Tanh).
        norm_eps (`float`): LayerNorm epsilon (1e-6 as in timm); configs saved with its old name `layer_norm_eps`
            still load (`attribute_map`).
        dyt_alpha_init (`float`): initial `alpha` of every DyT.
        hidden_dropout (`float`): dropout inside both MLPs (after the activation and after the output layer) and
            before the classifier.
        initializer_range (`float`): std of the normal init of embeddings and classifier/LM heads (the MLPs use
            timm's init: Xavier-uniform weights, tiny-normal biases; the patch embedding LeCun-normal).
        vocab_size (`int`): text mode vocabulary; the embedded byte tokenizer needs 263 (264 keeps it a multiple of 8).
        max_position_embeddings (`int`): text mode's fixed window (number of token positions).
        bidirectional (`bool`): text mode only: mix tokens in both directions (sequence/token classification).
            `False` (default) masks the token-mixing MLP causally.
        classifier_pooling (`str`): text sequence classification pooling; `"auto"` is the last real token for
            causal models and the mean of real tokens for bidirectional ones.
        use_layer_features (`bool`): text heads read a learned softmax-weighted mix of every layer's hidden states.
        tie_word_embeddings (`bool`): tie the causal-LM head to the token embeddings.

    Example:
        >>> from hf_extras import MlpMixerConfig, MlpMixerForImageClassification
        >>> config = MlpMixerConfig.from_preset("B/16", num_labels=1000)
        >>> model = MlpMixerForImageClassification(config)  # 59.9M parameters
    """

    model_type = "hfx_mlp_mixer"
    attribute_map = {"layer_norm_eps": "norm_eps"}  # the field's name before it joined `CommonConfig`

    modality: Literal["image", "text"] = "image"
    # image mode
    image_size: int = positive_int_field(default=224)
    patch_size: int = positive_int_field(default=16)
    num_channels: int = positive_int_field(default=3)
    # common fields with the Mixer's defaults (Mixer-B/16)
    hidden_size: int = positive_int_field(default=768)
    num_hidden_layers: int = positive_int_field(default=12)
    tokens_mlp_dim: int = positive_int_field(default=384)
    channels_mlp_dim: int = positive_int_field(default=3072)
    hidden_act: str = "gelu"
    norm_type: Literal["layernorm", "dyt"] = "layernorm"
    # text mode
    max_position_embeddings: int = positive_int_field(default=128)
    use_cache: bool = False  # no cache: generation recomputes the whole window at every step

    def __post_init__(self, **kwargs):
        legacy_eps = kwargs.pop("layer_norm_eps", None)
        if legacy_eps is not None:  # a config saved before the field was renamed: assign through the validator
            self.norm_eps = float(legacy_eps)
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MlpMixerConfig":
        """A config with the paper's sizes for `name` (`"S/16"`, `"B/16"`, `"L/16"`, or the /32 variants) at
        224 px; keyword arguments override any field (e.g. `num_labels=1000`, `image_size=384`)."""
        key = name.upper().replace("MIXER-", "").replace("MIXER_", "")
        if key not in PRESETS:
            raise ValueError(f"unknown MLP-Mixer preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[key], **overrides})

    @property
    def num_tokens(self) -> int:
        """Tokens mixed by the token-mixing MLP: patches per image, or the text window."""
        if self.modality == "image":
            return (self.image_size // self.patch_size) ** 2
        return self.max_position_embeddings

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate_patches_tile_image(self):
        """Patches must tile the image exactly."""
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by `patch_size` ({self.patch_size}): patches "
                f"must tile the image; pick an image size that is a multiple of {self.patch_size} or another patch size."
            )


__all__ = ["MlpMixerConfig", "PRESETS"]
