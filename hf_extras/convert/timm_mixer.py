"""Import timm `mixer_*` weights (`timm.models.mlp_mixer.MlpMixer`) into `MlpMixerForImageClassification`.

The hf_extras Mixer uses timm's module names under the base-model prefix `model`, so the conversion is a pure key
map plus shape checks, and the converted model gives the same logits as timm's:

    timm                                  hf_extras
    stem.proj.{weight,bias}               model.stem.proj.{weight,bias}
    blocks.N.norm1.{weight,bias}          model.blocks.N.norm1.{weight,bias}
    blocks.N.mlp_tokens.fc1.{weight,bias} model.blocks.N.mlp_tokens.fc1.{weight,bias}    (and fc2)
    blocks.N.norm2.{weight,bias}          model.blocks.N.norm2.{weight,bias}
    blocks.N.mlp_channels.fc1/fc2...      model.blocks.N.mlp_channels.fc1/fc2...
    norm.{weight,bias}                    model.norm.{weight,bias}
    head.{weight,bias}                    head.{weight,bias}

timm is not needed: pass a state dict (`timm_model.state_dict()` or `torch.load` of a timm checkpoint). Use the
image processor with timm's preprocessing for the pretrained weights (mean = std = 0.5, bicubic).

    >>> from hf_extras.convert import load_timm_mixer
    >>> model = load_timm_mixer(timm.create_model("mixer_b16_224", pretrained=True).state_dict())
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ..models.configuration_mlp_mixer import MlpMixerConfig
from ..models.modeling_mlp_mixer import MlpMixerForImageClassification

__all__ = [
    "timm_mixer_key_to_hf",
    "timm_mixer_shapes",
    "mlp_mixer_config_from_timm",
    "convert_timm_mixer_state_dict",
    "load_timm_mixer",
]

_BLOCK_PARAMS = (
    "norm1.weight", "norm1.bias",
    "mlp_tokens.fc1.weight", "mlp_tokens.fc1.bias", "mlp_tokens.fc2.weight", "mlp_tokens.fc2.bias",
    "norm2.weight", "norm2.bias",
    "mlp_channels.fc1.weight", "mlp_channels.fc1.bias", "mlp_channels.fc2.weight", "mlp_channels.fc2.bias",
)  # fmt: skip
_BLOCK_KEY = "|".join(map(re.escape, _BLOCK_PARAMS))
_KEY = re.compile(rf"^(stem\.proj\.(weight|bias)|blocks\.\d+\.({_BLOCK_KEY})|norm\.(weight|bias)|head\.(weight|bias))$")


def timm_mixer_key_to_hf(key: str) -> str:
    """The hf_extras name of one timm Mixer parameter (`ValueError` for a key timm's `MlpMixer` does not have)."""
    if not _KEY.match(key):
        raise ValueError(f"{key!r} is not a parameter of timm's MlpMixer (mixer_* models)")
    return key if key.startswith("head.") else f"model.{key}"


def timm_mixer_shapes(config: MlpMixerConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a timm `MlpMixer` state dict with this config's sizes, and its shape (timm's names)."""
    c, t = config.hidden_size, config.num_patches
    ds, dc, p = config.tokens_mlp_dim, config.channels_mlp_dim, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {"stem.proj.weight": (c, config.num_channels, p, p), "stem.proj.bias": (c,)}
    for i in range(config.num_hidden_layers):
        block = {
            "norm1.weight": (c,), "norm1.bias": (c,),
            "mlp_tokens.fc1.weight": (ds, t), "mlp_tokens.fc1.bias": (ds,),
            "mlp_tokens.fc2.weight": (t, ds), "mlp_tokens.fc2.bias": (t,),
            "norm2.weight": (c,), "norm2.bias": (c,),
            "mlp_channels.fc1.weight": (dc, c), "mlp_channels.fc1.bias": (dc,),
            "mlp_channels.fc2.weight": (c, dc), "mlp_channels.fc2.bias": (c,),
        }  # fmt: skip
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"norm.weight": (c,), "norm.bias": (c,)})
    shapes.update({"head.weight": (config.num_labels, c), "head.bias": (config.num_labels,)})
    return shapes


def mlp_mixer_config_from_timm(state_dict: Mapping[str, torch.Tensor], **overrides) -> MlpMixerConfig:
    """Read the sizes (width, depth, patch, image size, MLP widths, classes) off a timm Mixer state dict."""
    for key in (
        "stem.proj.weight",
        "blocks.0.mlp_tokens.fc1.weight",
        "blocks.0.mlp_channels.fc1.weight",
        "head.weight",
    ):
        if key not in state_dict:
            raise ValueError(f"not a timm MlpMixer state dict with a classifier head: {key!r} is missing")
    hidden, channels, patch, _ = state_dict["stem.proj.weight"].shape
    tokens_mlp_dim, num_patches = state_dict["blocks.0.mlp_tokens.fc1.weight"].shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"timm Mixer with {num_patches} patches: only square images are supported")
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    values = dict(
        modality="image",
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=depth,
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=state_dict["blocks.0.mlp_channels.fc1.weight"].shape[0],
        num_labels=state_dict["head.weight"].shape[0],
        norm_type="layernorm",
        norm_eps=1e-6,
        hidden_act="gelu",
    )
    values.update(overrides)
    return MlpMixerConfig(**values)


def convert_timm_mixer_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MlpMixerConfig
) -> dict[str, torch.Tensor]:
    """Rename a timm Mixer state dict to `MlpMixerForImageClassification`'s, checking keys and shapes.

    Raises `ValueError` naming every missing, unexpected or mis-shaped key (so a checkpoint for another size or a
    different timm model fails here, not deep inside `load_state_dict`).
    """
    if config.modality != "image" or config.norm_type != "layernorm":
        raise ValueError("timm Mixer weights need an image-mode config with norm_type='layernorm'")
    expected = timm_mixer_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            problems.append(f"shape mismatches {wrong[:6]}{' ...' if len(wrong) > 6 else ''}")
        raise ValueError(
            "the timm Mixer state dict does not match the config (build the config with "
            "`mlp_mixer_config_from_timm(state_dict)`): " + "; ".join(problems)
        )
    return {timm_mixer_key_to_hf(k): v for k, v in state_dict.items()}


def load_timm_mixer(
    state_dict: Mapping[str, torch.Tensor], config: MlpMixerConfig | None = None, **config_overrides
) -> MlpMixerForImageClassification:
    """`MlpMixerForImageClassification` with a timm Mixer's weights (config read off the state dict if not given)."""
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):  # a timm model itself
        state_dict = state_dict.state_dict()
    if config is None:
        config = mlp_mixer_config_from_timm(state_dict, **config_overrides)
    converted = convert_timm_mixer_state_dict(state_dict, config)
    model = MlpMixerForImageClassification(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()
