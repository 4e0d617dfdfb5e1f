"""Image processor of the MLP-Mixer family: resize (to the model's fixed size, or the short side then a centre crop, as
timm's evaluation transform), rescale, normalize, channels first."""

from __future__ import annotations

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ImageType, PILImageResampling, get_image_type
from transformers.processing_utils import ImagesKwargs


class MlpMixerImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus `num_channels`: 1 (grayscale) or 3 (RGB); inputs are converted to it."""

    num_channels: int


class MlpMixerImageProcessor(PilBackend):
    r"""
    Prepares images for `MlpMixerForImageClassification`: convert to `num_channels` channels (RGB or grayscale),
    resize to `size` (the model's fixed `image_size`; bicubic, as timm's Mixer configs), rescale by 1/255,
    normalize with `image_mean`/`image_std` (0.5 per channel: pixels land in [-1, 1], timm's Mixer convention),
    channels first. Returns `pixel_values` of shape (batch, num_channels, height, width).

    timm's evaluation transform instead resizes the short side to `image_size / crop_pct` (256 for 224 at
    crop_pct 0.875) and centre-crops `image_size`: `size={"shortest_edge": 256}, do_center_crop=True,
    crop_size={"height": 224, "width": 224}` (what `hf_extras.convert.import_timm_mixer` saves). The crop offset
    rounds as torchvision's `CenterCrop` does, so the pixels equal timm's.

    PIL/NumPy based (no torchvision). `MlpMixerImageProcessor.from_model_config(config)` matches a model config.

    Example:
        >>> processor = MlpMixerImageProcessor(size={"height": 224, "width": 224})
        >>> processor(pil_image, return_tensors="pt")["pixel_values"].shape
        torch.Size([1, 3, 224, 224])
    """

    valid_kwargs = MlpMixerImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    size = {"height": 224, "width": 224}
    num_channels = 3
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    do_resize = True
    do_center_crop = False
    crop_size = None
    do_rescale = True
    do_normalize = True

    def __init__(self, **kwargs):
        channels = kwargs.get("num_channels") or type(self).num_channels
        if channels not in (1, 3):
            raise ValueError(f"`num_channels` must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
        # default mean/std follow the channel count (one 0.5 per channel)
        kwargs.setdefault("image_mean", (0.5,) * channels)
        kwargs.setdefault("image_std", (0.5,) * channels)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> MlpMixerImageProcessor:
        """The processor for an image-mode `MlpMixerConfig` (its `image_size` and `num_channels`)."""
        size = {"height": config.image_size, "width": config.image_size}
        return cls(**{"size": size, "num_channels": config.num_channels, **kwargs})

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        """Centre crop of a channels-first image, offsets rounded as torchvision's `CenterCrop`
        (`round((height - crop) / 2)`; transformers' own crop floors, one pixel off for some sizes)."""
        height, width = image.shape[-2:]
        if size.height is None or size.width is None or size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # padding case (and the error for a bad size)
        top, left = int(round((height - size.height) / 2.0)), int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, num_channels=None, **kwargs):
        channels = num_channels or self.num_channels
        if get_image_type(image) == ImageType.PIL:
            wanted_mode = "L" if channels == 1 else "RGB"
            if image.mode != wanted_mode:
                image = image.convert(wanted_mode)
        image = super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )
        have = image.shape[0]
        if have == channels:
            return image
        if channels == 3 and have == 1:
            return np.repeat(image, 3, axis=0)
        if channels == 3 and have == 4:
            return image[:3]
        if channels == 1 and have in (3, 4):  # ITU-R 601-2 luma, as PIL's "L" conversion
            luma = np.tensordot(np.array([0.299, 0.587, 0.114]), image[:3].astype(np.float64), axes=1)[None]
            if np.issubdtype(image.dtype, np.integer):
                luma = np.clip(np.rint(luma), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max)
            return luma.astype(image.dtype)
        raise ValueError(f"cannot convert an image with {have} channels to {channels} channels")


MlpMixerImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["MlpMixerImageProcessor"]
