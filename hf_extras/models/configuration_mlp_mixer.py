"""MLP-Mixer configuration (`model_type="hfx_mlp_mixer"`)."""

# No `from __future__ import annotations` in config files: @strict validates against the real (unstringified) types.
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_common import check_hidden_act

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
class MlpMixerConfig(PreTrainedConfig):
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
        layer_norm_eps (`float`): LayerNorm epsilon (1e-6 as in timm).
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

    modality: Literal["image", "text"] = "image"
    # image mode
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    # shared (defaults: Mixer-B/16)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    tokens_mlp_dim: int = 384
    channels_mlp_dim: int = 3072
    hidden_act: str = "gelu"
    norm_type: Literal["layernorm", "dyt"] = "layernorm"
    layer_norm_eps: float = 1e-6
    dyt_alpha_init: float = 0.5
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    # text mode
    vocab_size: int = 264
    max_position_embeddings: int = 128
    bidirectional: bool = False
    classifier_pooling: Literal["auto", "last", "mean", "first"] = "auto"
    use_layer_features: bool = False
    tie_word_embeddings: bool = True
    use_cache: bool = False  # no cache: generation recomputes the whole window at every step
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2

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

    def validate_architecture(self):
        """Sizes must be positive; patches must tile the image exactly."""
        names = (
            "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "tokens_mlp_dim",
            "channels_mlp_dim", "vocab_size", "max_position_embeddings",
        )  # fmt: skip
        for name in names:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by `patch_size` ({self.patch_size}): patches "
                f"must tile the image; pick an image size that is a multiple of {self.patch_size} or another patch size."
            )

    def validate_hidden_act(self):
        """The MLP activation must exist (an unknown name would fail only when the model is built or run)."""
        check_hidden_act(self.hidden_act)

    def validate_regularisation(self):
        """Dropout in [0, 1); positive epsilon; a valid pad id in text mode."""
        if not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError(f"`hidden_dropout` must be in [0, 1), got {self.hidden_dropout}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be > 0, got {self.layer_norm_eps}.")
        if self.initializer_range < 0:
            raise ValueError(f"`initializer_range` must be >= 0, got {self.initializer_range}.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"`pad_token_id` ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size}) or None."
            )


__all__ = ["MlpMixerConfig", "PRESETS"]
