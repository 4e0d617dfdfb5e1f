"""Import timm `mixer_*` weights (`timm.models.mlp_mixer.MlpMixer`) into `MlpMixerForImageClassification`.

The hf_extras Mixer uses timm's module names under the base-model prefix `model` (the classifier `head` stays at the
top), so the conversion is that prefix plus shape checks against one table (`_BLOCK_SHAPES`), and the converted model
gives the same logits as timm's.

timm is not needed: pass a state dict (`timm_model.state_dict()` or `torch.load` of a timm checkpoint).
`import_timm_mixer` also returns (and saves) the image processor that reproduces timm's evaluation transform for the
pretrained weights (short side to `image_size / crop_pct`, bicubic, centre crop, mean = std = 0.5 by default; pass
the checkpoint's `pretrained_cfg` / `resolve_data_config` dict when it differs), so logits match timm's:

    >>> from hf_extras.convert import import_timm_mixer
    >>> timm_model = timm.create_model("mixer_b16_224", pretrained=True)
    >>> model, processor = import_timm_mixer(timm_model.state_dict(), timm_model.pretrained_cfg, "mixer-b16-hf")
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch

from ..models.configuration_mlp_mixer import MlpMixerConfig
from ..models.image_processing_mlp_mixer import MlpMixerImageProcessor
from ..models.modeling_mlp_mixer import MlpMixerForImageClassification

__all__ = [
    "timm_mixer_key_to_hf",
    "timm_mixer_shapes",
    "mlp_mixer_config_from_timm",
    "convert_timm_mixer_state_dict",
    "load_timm_mixer",
    "TIMM_MIXER_DATA_CONFIG",
    "timm_mixer_image_processor",
    "import_timm_mixer",
]

# timm's data config of its `mixer_*` ImageNet checkpoints (`timm.models.mlp_mixer._cfg`)
TIMM_MIXER_DATA_CONFIG = {
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}  # PIL's codes

# the one table of a timm Mixer block's parameters and their shapes, in the sizes c (width), t (patches),
# ds (token-MLP width), dc (channel-MLP width); keys are the same in hf_extras under `model.`
_BLOCK_SHAPES = {
    "norm1.weight": ("c",), "norm1.bias": ("c",),
    "mlp_tokens.fc1.weight": ("ds", "t"), "mlp_tokens.fc1.bias": ("ds",),
    "mlp_tokens.fc2.weight": ("t", "ds"), "mlp_tokens.fc2.bias": ("t",),
    "norm2.weight": ("c",), "norm2.bias": ("c",),
    "mlp_channels.fc1.weight": ("dc", "c"), "mlp_channels.fc1.bias": ("dc",),
    "mlp_channels.fc2.weight": ("c", "dc"), "mlp_channels.fc2.bias": ("c",),
}  # fmt: skip
_BLOCK_PARAMS = tuple(_BLOCK_SHAPES)
_BLOCK_KEY = "|".join(map(re.escape, _BLOCK_PARAMS))
_KEY = re.compile(rf"^(stem\.proj\.(weight|bias)|blocks\.\d+\.({_BLOCK_KEY})|norm\.(weight|bias)|head\.(weight|bias))$")


def timm_mixer_key_to_hf(key: str) -> str:
    """The hf_extras name of one timm Mixer parameter (`ValueError` for a key timm's `MlpMixer` does not have)."""
    if not _KEY.match(key):
        raise ValueError(f"{key!r} is not a parameter of timm's MlpMixer (mixer_* models)")
    return key if key.startswith("head.") else f"model.{key}"


def timm_mixer_shapes(config: MlpMixerConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a timm `MlpMixer` state dict with this config's sizes, and its shape (timm's names)."""
    c, p = config.hidden_size, config.patch_size
    sizes = {"c": c, "t": config.num_patches, "ds": config.tokens_mlp_dim, "dc": config.channels_mlp_dim}
    block = {name: tuple(sizes[d] for d in dims) for name, dims in _BLOCK_SHAPES.items()}
    shapes: dict[str, tuple[int, ...]] = {"stem.proj.weight": (c, config.num_channels, p, p), "stem.proj.bias": (c,)}
    for i in range(config.num_hidden_layers):
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
    """`MlpMixerForImageClassification` with a timm Mixer's weights (config read off the state dict if not given).

    For the image processor that matches timm's preprocessing, use `import_timm_mixer` (or
    `timm_mixer_image_processor`): resizing straight to `image_size` is not what the pretrained weights saw.
    """
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):  # a timm model itself
        state_dict = state_dict.state_dict()
    if config is None:
        config = mlp_mixer_config_from_timm(state_dict, **config_overrides)
    converted = convert_timm_mixer_state_dict(state_dict, config)
    model = MlpMixerForImageClassification(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def timm_mixer_image_processor(data_config: Mapping | None = None, image_size: int = 224) -> MlpMixerImageProcessor:
    """The image processor that reproduces timm's evaluation transform for a data config.

    `data_config` is timm's (`model.pretrained_cfg`, or `timm.data.resolve_data_config(model=model)`): keys
    `input_size` (C, H, W), `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode` (`"center"` or `"squash"`);
    missing keys take the values of timm's Mixer checkpoints (`TIMM_MIXER_DATA_CONFIG`) and `image_size`. As in timm,
    the image is resized to `floor(image_size / crop_pct)` (the short side for `"center"`, both sides for
    `"squash"`), then centre-cropped to `image_size`.
    """
    cfg = {**TIMM_MIXER_DATA_CONFIG, **(data_config or {})}
    channels, height, width = cfg.get("input_size", (len(cfg["mean"]), image_size, image_size))
    if height != width:
        raise ValueError(f"`input_size` {cfg['input_size']} is not square: the Mixer's image size is one number.")
    interpolation = cfg["interpolation"]
    if interpolation not in _RESAMPLE:
        raise ValueError(f"`interpolation` {interpolation!r} is not one of {sorted(_RESAMPLE)} (timm's names).")
    crop_pct = cfg["crop_pct"] if cfg["crop_pct"] is not None else TIMM_MIXER_DATA_CONFIG["crop_pct"]
    scale = math.floor(height / crop_pct)
    if cfg["crop_mode"] == "center":
        size = {"shortest_edge": scale}
    elif cfg["crop_mode"] == "squash":
        size = {"height": scale, "width": scale}
    else:
        raise ValueError(f"`crop_mode` {cfg['crop_mode']!r} is not supported: use 'center' or 'squash'.")
    return MlpMixerImageProcessor(
        size=size,
        do_center_crop=True,
        crop_size={"height": height, "width": width},
        resample=_RESAMPLE[interpolation],
        image_mean=tuple(float(m) for m in cfg["mean"]),
        image_std=tuple(float(s) for s in cfg["std"]),
        num_channels=channels,
    )


def import_timm_mixer(
    state_dict: Mapping[str, torch.Tensor],
    data_config: Mapping | None = None,
    save_directory: str | os.PathLike | None = None,
    config: MlpMixerConfig | None = None,
    **config_overrides,
) -> tuple[MlpMixerForImageClassification, MlpMixerImageProcessor]:
    """A timm Mixer as `(model, image processor)`: the weights (`load_timm_mixer`) and the processor of timm's
    evaluation transform for `data_config` (`timm_mixer_image_processor`); both saved to `save_directory` if given,
    so `pipeline("image-classification", model=save_directory)` preprocesses as timm does."""
    model = load_timm_mixer(state_dict, config, **config_overrides)
    processor = timm_mixer_image_processor(data_config, model.config.image_size)
    if processor.crop_size.height != model.config.image_size or processor.num_channels != model.config.num_channels:
        raise ValueError(
            f"the data config's input size ({processor.num_channels}, {processor.crop_size.height}, "
            f"{processor.crop_size.width}) does not match the checkpoint ({model.config.num_channels}, "
            f"{model.config.image_size}, {model.config.image_size})."
        )
    if save_directory is not None:
        model.save_pretrained(save_directory)
        processor.save_pretrained(save_directory)
    return model, processor
