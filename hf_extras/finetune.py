"""The fine-tuning method switch of `hf-extras train`: full, LoRA, IA3, bottleneck adapters or prompt tuning.

`FinetuneArguments` is parsed with the run's other argument dataclasses; `apply_finetune_method` wraps the model
once it is built (PEFT through `get_peft_model` with the families' default target modules from `peft_maps`,
adapters through `hf_extras.adapters`), `save_finetuned` writes what reloads: the whole model for `full`, the
PEFT adapter folder (`PeftModel.from_pretrained`) or the bottleneck adapter (`load_adapter`) otherwise, each with the
task head, and `load_finetuned` reads any of them back. A base model that did not come from a folder (a run from a config) is saved next to the adapter, in
`base_model/`, and the adapter's config points there, so the run folder reloads on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .adapters import (
    ADAPTER_CONFIG_NAME,
    BottleneckConfig,
    add_adapter,
    load_adapter,
    save_adapter,
    set_trainable_modules,
    train_adapter,
)
from .errors import ConfigError
from .peft_maps import head_module_names

__all__ = [
    "FinetuneArguments",
    "apply_finetune_method",
    "count_parameters",
    "load_finetuned",
    "peft_task_type",
    "save_finetuned",
]

BASE_MODEL_DIR = "base_model"
PEFT_METHODS = ("lora", "ia3", "prompt_tuning")

# class-name suffix -> PEFT task type (our heads and transformers' own follow the same naming)
_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForCausalLM": "CAUSAL_LM",
}
# heads PEFT's task models already put in `modules_to_save` themselves
_PEFT_SAVES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# prompt tuning prepends virtual tokens; PEFT shifts the labels of these task types only (token-level labels and
# QA positions would point at the wrong tokens)
_PROMPT_TUNING_TASKS = ("SEQ_CLS", "CAUSAL_LM")


@dataclass
class FinetuneArguments:
    """Which parameters a run trains, and how (parsed with the other `hf-extras train` arguments)."""

    _argument_group_name = "fine-tuning method"

    finetune_method: Literal["full", "lora", "ia3", "adapter", "prompt_tuning"] = field(
        default="full",
        metadata={"help": "full: every weight; lora / ia3 / prompt_tuning: PEFT; adapter: bottleneck adapters."},
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "With finetune_method=full: train only the task head (and weighted layer features)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    peft_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules LoRA / IA3 adapt; unset = the family's defaults (hf_extras.peft_maps)."},
    )
    adapter_size: int = field(default=16, metadata={"help": "Bottleneck adapter width."})
    adapter_placement: Literal["houlsby", "pfeiffer"] = field(
        default="houlsby", metadata={"help": "houlsby: after the mixer and the FFN; pfeiffer: after the FFN."}
    )
    adapter_activation: str = field(default="gelu", metadata={"help": "Bottleneck activation (ACT2FN name)."})
    adapter_train_norms: bool = field(default=False, metadata={"help": "Also train (and save) every norm."})
    adapter_name: str = field(default="default", metadata={"help": "Name of the bottleneck adapter."})
    num_virtual_tokens: int = field(default=16, metadata={"help": "Prompt tuning: number of virtual tokens."})

    def __post_init__(self):
        if self.freeze_backbone and self.finetune_method != "full":
            raise ConfigError(
                f"freeze_backbone applies to finetune_method=full; {self.finetune_method!r} already freezes the backbone"
            )
        for key in ("lora_r", "lora_alpha", "adapter_size", "num_virtual_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.finetune_method == "adapter":
            self.bottleneck_config()  # its own validation names the bad field

    def bottleneck_config(self) -> BottleneckConfig:
        try:
            return BottleneckConfig(
                bottleneck_size=self.adapter_size, placement=self.adapter_placement, activation=self.adapter_activation
            )
        except ValueError as error:  # name the command-line keys, not the config's fields
            message = str(error)
            for config_key, cli_key in (("bottleneck_size", "adapter_size"), ("placement", "adapter_placement"),
                                        ("activation", "adapter_activation")):  # fmt: skip
                message = message.replace(f"BottleneckConfig.{config_key}", cli_key)
            raise ConfigError(message) from error


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a model's head, from its class name (`None`: masked LM, bare model, image head)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts and the trainable share (in percent)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
    }


def _peft_config(model: nn.Module, args: FinetuneArguments):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    task_type = peft_task_type(model)
    extra = [n for n in head_module_names(model) if n not in _PEFT_SAVES.get(task_type, ())]
    common = {"task_type": task_type, **({"modules_to_save": extra} if extra else {})}
    if args.finetune_method == "lora":
        return LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=args.peft_target_modules, **common,
        )  # fmt: skip
    if args.finetune_method == "ia3":
        return IA3Config(target_modules=args.peft_target_modules, **common)
    if task_type not in _PROMPT_TUNING_TASKS:
        raise ConfigError(
            f"prompt_tuning supports sequence classification and causal LM heads, not {type(model).__name__}: "
            "the virtual tokens it prepends would shift token-level labels and answer positions"
        )
    return PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens, **common)


def apply_finetune_method(
    model: nn.Module, args: FinetuneArguments, output_dir: str | Path | None = None, is_main_process: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Wrap or freeze `model` for `args.finetune_method`; returns the model to train and its parameter counts.

    For a parameter-efficient method on a model that was not loaded from a folder, the (unchanged) base model is
    first saved to `output_dir/base_model` (on the main process), so that the saved adapter can name its base.
    """
    method = args.finetune_method
    if method in PEFT_METHODS or method == "adapter":
        if not getattr(model, "name_or_path", "") and output_dir is not None:
            base_dir = Path(output_dir) / BASE_MODEL_DIR
            if is_main_process:
                model.save_pretrained(base_dir)
            model.name_or_path = str(base_dir.resolve())
    if method in PEFT_METHODS:
        from peft import get_peft_model

        model = get_peft_model(model, _peft_config(model, args))
    elif method == "adapter":
        add_adapter(model, args.adapter_name, args.bottleneck_config())
        train_adapter(model, args.adapter_name, train_head=True, train_norms=args.adapter_train_norms)
    elif args.freeze_backbone:
        head = head_module_names(model)
        if not head:
            raise ConfigError(f"freeze_backbone needs a task head to train; {type(model).__name__} has none")
        set_trainable_modules(model, head)
    counts = {"finetune_method": method, **count_parameters(model)}
    print(
        f"fine-tuning: {method}, trainable parameters {counts['trainable_parameters']:,} of "
        f"{counts['total_parameters']:,} ({counts['trainable_percent']:.2f}%)"
    )
    return model, counts


def save_finetuned(model: nn.Module, output_dir: str | Path, args: FinetuneArguments, processing_class=None) -> None:
    """Write a trained model so that `load_finetuned` (or the underlying loaders) reload it.

    `full`: the whole model (`save_pretrained`). PEFT methods: the PEFT folder (adapter weights and the
    `modules_to_save` heads; `PeftModel.from_pretrained`). `adapter`: the bottleneck adapter and head
    (`load_adapter`). Both adapter kinds also get the task model's `config.json` (labels, head sizes), since the base
    folder they name may hold another head's config. `hf-extras train` saves `full` through `Trainer.save_model`.
    """
    output_dir = Path(output_dir)
    if args.finetune_method == "adapter":
        save_adapter(model, output_dir, args.adapter_name, save_head=True, save_norms=args.adapter_train_norms)
    else:
        model.save_pretrained(str(output_dir))
    if args.finetune_method != "full":
        model.config.save_pretrained(str(output_dir))
    if processing_class is not None:
        processing_class.save_pretrained(str(output_dir))


def load_finetuned(directory: str | Path, auto_class: type, **kwargs) -> nn.Module:
    """Load what `save_finetuned` wrote, whichever method it was, with `auto_class` (e.g. AutoModelForCausalLM).

    A PEFT folder comes back as a `PeftModel` on its base, a bottleneck adapter as the base model with the adapter
    loaded and active; the task model's saved config (labels, head sizes) is used for the base.
    """
    from transformers import AutoConfig

    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base_path = PeftConfig.from_pretrained(str(directory)).base_model_name_or_path
    elif (directory / ADAPTER_CONFIG_NAME).is_file():
        base_path = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"]
    else:
        return auto_class.from_pretrained(str(directory), **kwargs)
    if not base_path:
        raise ValueError(
            f"the adapter in {directory} does not name its base model; load the base and the adapter yourself."
        )
    kwargs.setdefault("config", AutoConfig.from_pretrained(str(directory)))
    base = auto_class.from_pretrained(base_path, **kwargs)
    if (directory / ADAPTER_CONFIG_NAME).is_file():
        load_adapter(base, directory)
        return base
    return PeftModel.from_pretrained(base, str(directory))
