"""Image classification: data (scikit-learn's bundled digits, no download), preprocessing, collator, accuracy.

The digits set (`sklearn.datasets.load_digits`) is 1,797 grayscale 8x8 images of handwritten digits with pixel
values 0..16. The held-out split is a stratified, seeded share of it. Pixels become `pixel_values` exactly as
`MlpMixerImageProcessor(size=8x8, num_channels=1)` prepares an 8-bit grayscale image of the digit
(`value / 16` in place of `value / 255`, then mean = std = 0.5), so the processor saved beside a trained model
serves it through `pipeline("image-classification")`.

`hf-extras train configs/mixer_digits.yaml` runs this task (`task: image_classification`, `ImageClassificationTask`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForImageClassification

from ..errors import ConfigError
from ..models.image_processing_mlp_mixer import MlpMixerImageProcessor
from .base import Task

__all__ = [
    "DIGITS_LABELS",
    "load_digits_splits",
    "digits_to_pixel_values",
    "digits_to_pil",
    "prepare_image_classification_dataset",
    "image_classification_collator",
    "compute_accuracy",
    "ImageClassificationArguments",
    "ImageClassificationTask",
]

DIGITS_LABELS = [str(i) for i in range(10)]
DIGITS_MAX_VALUE = 16.0


def load_digits_splits(validation_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as a `DatasetDict` with `train` and `validation` splits (`pixels` 8x8 ints, `label`).

    The validation split is a stratified `validation_fraction` share, drawn with `seed` (same seed, same split).
    """
    from datasets import Dataset, DatasetDict
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be in (0, 1), got {validation_fraction}")
    digits = load_digits()
    images = digits.images.astype(np.int64)  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=validation_fraction, stratify=labels, random_state=seed
    )

    def split(idx: np.ndarray) -> Dataset:
        return Dataset.from_dict({"pixels": images[idx].tolist(), "label": labels[idx].tolist()})

    return DatasetDict({"train": split(train_idx), "validation": split(val_idx)})


def digits_to_pixel_values(pixels, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """Digits pixels (..., 8, 8) in 0..16 -> float32 `pixel_values` (..., 1, 8, 8), normalized like the processor."""
    array = np.asarray(pixels, dtype=np.float32) / DIGITS_MAX_VALUE
    return ((array - mean) / std)[..., None, :, :].astype(np.float32)


def digits_to_pil(pixels):
    """One digit (8x8, values 0..16) as an 8-bit grayscale PIL image (0..255), e.g. for `pipeline()`."""
    from PIL import Image

    array = np.asarray(pixels, dtype=np.float64) * (255.0 / DIGITS_MAX_VALUE)
    return Image.fromarray(np.rint(array).astype(np.uint8), mode="L")


def prepare_image_classification_dataset(raw, num_proc: int | None = None):
    """Every split with `pixel_values` (1, 8, 8) float32 and `labels`, as `MlpMixerForImageClassification` takes."""

    def convert(batch: dict[str, list]) -> dict[str, Any]:
        return {"pixel_values": digits_to_pixel_values(batch["pixels"]), "labels": batch["label"]}

    return raw.map(convert, batched=True, num_proc=num_proc, remove_columns=raw["train"].column_names, desc="pixels")


def image_classification_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `pixel_values` into a float tensor and `labels` into a long tensor."""
    pixel_values = torch.as_tensor(np.stack([np.asarray(f["pixel_values"], dtype=np.float32) for f in features]))
    batch = {"pixel_values": pixel_values}
    if "labels" in features[0]:
        batch["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
    return batch


def compute_accuracy(eval_pred) -> dict[str, float]:
    """`Trainer(compute_metrics=...)`: share of held-out images whose top logit is the label."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


@dataclass
class ImageClassificationArguments:
    """Options of the `image_classification` task (data: `dataset_name` unset or `digits`)."""

    _argument_group_name = "image_classification task"

    sample_images: int = field(
        default=8, metadata={"help": "Held-out images classified through pipeline() after training (0 = none)."}
    )
    torch_threads: int | None = field(
        default=None,
        metadata={
            "help": "Cap torch's intra-op CPU threads for the run (unset = torch's default). Tiny models gain nothing "
            "from several threads, and on a busy machine thread synchronisation can make each step many times slower."
        },
    )


class ImageClassificationTask(Task):
    """Image classification of scikit-learn's digits (offline) with `AutoModelForImageClassification`."""

    name = "image_classification"
    arguments = ImageClassificationArguments
    auto_model = AutoModelForImageClassification
    pipeline_tag = "image-classification"
    result_metrics = (("eval loss", "eval_loss"), ("accuracy", "eval_accuracy"))
    compute_metrics = staticmethod(compute_accuracy)

    def load_data(self, data_args, seed):
        if data_args.dataset_name not in (None, "digits"):
            raise ConfigError(
                f"task 'image_classification' reads scikit-learn's bundled digits (dataset_name unset or "
                f"'digits'), got dataset_name={data_args.dataset_name!r}"
            )
        fraction = data_args.validation_fraction
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {fraction}")
        return load_digits_splits(fraction, seed)

    def config_defaults(self, task_args, tokenizer, raw):
        return {
            "modality": "image",
            "image_size": 8,
            "num_channels": 1,
            "num_labels": len(DIGITS_LABELS),
            "id2label": dict(enumerate(DIGITS_LABELS)),
            "label2id": {label: i for i, label in enumerate(DIGITS_LABELS)},
        }

    def prepare(self, task_args, tokenizer, raw, num_proc):
        if task_args.torch_threads is not None:
            if task_args.torch_threads < 1:
                raise ConfigError(f"torch_threads must be >= 1, got {task_args.torch_threads}")
            torch.set_num_threads(task_args.torch_threads)
        self._raw_validation = raw["validation"]
        return prepare_image_classification_dataset(raw, num_proc)

    def collator(self, task_args, tokenizer):
        return image_classification_collator

    def processing_class(self, task_args, tokenizer, config):
        return MlpMixerImageProcessor.from_model_config(config)

    def sample(self, task_args, model, tokenizer):
        if task_args.sample_images <= 0:
            return None
        from transformers import pipeline

        processor = MlpMixerImageProcessor.from_model_config(model.config)
        rows = self._raw_validation.select(range(min(task_args.sample_images, len(self._raw_validation))))
        classify = pipeline("image-classification", model=model, image_processor=processor, device=model.device)
        predictions = classify([digits_to_pil(p) for p in rows["pixels"]], top_k=1)
        pairs = [f"{DIGITS_LABELS[y]}->{p[0]['label']}" for y, p in zip(rows["label"], predictions)]
        return {
            "prompt": "held-out digits, true->predicted: ",
            "completion": " ".join(pairs),
            "decoding": "pipeline('image-classification') on PIL images",
        }
