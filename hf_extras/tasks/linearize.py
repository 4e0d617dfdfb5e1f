"""Linearize a pretrained Transformer (`task: linearize`): copy it into a linear family, then train in two stages.

The run (`hf-extras train configs/linearize.yaml --teacher_model_name_or_path FOLDER`):

1. `hf_extras.convert.linearize` copies the teacher (a transformers Llama-style causal LM folder, loaded with
   `AutoModelForCausalLM`) into `into` (`hfx_gated_retention`, `hfx_retnet` or `hfx_gated_deltanet`; the run's
   `model_type`, whose config keys such as `gate` or `feature_map` are accepted as overrides). `layer_types` (a list,
   one entry per teacher layer, or a preset name such as `3:1`; checked against the teacher's config when the
   arguments are parsed) keeps some teacher layers as softmax attention, exactly the teacher's.
2. Stage 1, attention transfer (`stage1_steps`): every new linear mixer learns to reproduce its teacher layer's
   attention output given the teacher's input to that layer (`attention_transfer_loss`, MSE per layer, layers
   independent); every other weight is frozen, kept attention layers included (they are exact: skipped, not
   reported; with no linear layer at all, stage 1 is skipped). It runs on a `Trainer` whose model is
   `AttentionTransfer` (the student, plus the teacher kept out of its parameters), with its own learning rate
   (`stage1_learning_rate`).
3. Stage 2 (`stage2_steps`, or `max_steps`): the whole model, or LoRA / the other methods of `finetune_method`, on
   next-token loss plus `kl_weight * T^2 KL(teacher_T || student_T)` at temperature `temperature`
   (`DistillationTrainer`). This is the run's main Trainer: its evaluation before training is the model after
   stage 1, and it writes the run folder, which loads with `AutoModelForCausalLM` (and with `trust_remote_code=True`
   without hf_extras).

`metrics.json` adds the teacher's validation loss, the copy's before stage 1, and stage 1's per-layer MSE before and
after (the linear layers, whose block indices are `stage1_layers`), so one run gives the teacher / after stage 1 /
after stage 2 comparison. Data: the causal-LM task's packed blocks (embedded offline corpus by default).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments

from ..convert.linearize import (
    LINEARIZE_TARGETS,
    attention_transfer_loss,
    kl_to_teacher,
    linear_layer_indices,
    linearize,
    resolve_layer_types,
)
from ..data.packing import Packing
from ..errors import ConfigError
from .causal_lm import CausalLMArguments, CausalLMTask

__all__ = [
    "AttentionTransfer",
    "DistillationTrainer",
    "LinearizeArguments",
    "LinearizeTask",
    "run_attention_transfer",
    "stage1_parameters",
]


@dataclass
class LinearizeArguments(CausalLMArguments):
    """Options of the `linearize` task (plus the causal-LM task's `block_size` and sample settings)."""

    _argument_group_name = "linearize task"

    packing: Packing = field(
        default="concat",
        metadata={
            "help": "Only `concat` (eos-separated blocks): stage 1's attention transfer and the teacher's KL logits "
            "do not read document boundaries."
        },
    )

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder of the teacher (a transformers Llama/Mistral/Qwen2/Qwen3 causal LM)."}
    )
    into: str | None = field(
        default=None,
        metadata={"help": f"Target family ({', '.join(LINEARIZE_TARGETS)}); sets model_type (and its config keys)."},
    )
    stage1_steps: int = field(default=100, metadata={"help": "Attention-transfer optimizer steps (0 = skip)."})
    stage1_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of stage 1."})
    stage1_train: Literal["mixer", "new"] = field(
        default="mixer",
        metadata={
            "help": "Stage 1 trains every mixer weight (`mixer`) or only those the teacher lacks (`new`: decays, "
            "gates, norms, conv; the copied q/k/v/o projections stay frozen)."
        },
    )
    stage2_steps: int | None = field(
        default=None, metadata={"help": "Stage 2 optimizer steps; unset = max_steps (setting both differently fails)."}
    )
    kl_weight: float = field(default=0.0, metadata={"help": "Weight of the KL term to the teacher's logits."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term."})
    decay_horizons: list[float] = field(
        default_factory=lambda: [32.0, 2048.0],
        metadata={"help": "Initial memory (tokens) of the shortest and longest data-dependent decay."},
    )
    layer_types: list[str] | None = field(
        default=None,
        metadata={
            "help": "Teacher layers kept as softmax attention: one entry per teacher layer (linear_attention, "
            "full_attention, sliding_attention where the teacher slides) or a preset name (3:1, 3:1-sliding); "
            "unset = every layer linear."
        },
    )
    ignore_sliding_window: bool = field(
        default=False,
        metadata={
            "help": "Accept linear (or full attention) layers where the teacher attends within a sliding window "
            "(they see the whole past)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.packing != "concat":
            raise ConfigError(
                f"packing={self.packing!r} is not supported by task linearize: stage 1's attention transfer and the "
                "teacher's KL logits see whole blocks and do not read document boundaries; set packing: concat"
            )
        self.check_layer_types()

    def check_layer_types(self) -> None:
        """Check `layer_types` against the teacher's config when its folder is there (before any data loads); a
        missing or unreadable folder is reported when the teacher loads."""
        path = self.teacher_model_name_or_path
        if path is None or not (Path(path) / "config.json").is_file():
            return
        try:
            teacher_config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            return
        resolve_layer_types(teacher_config, self.layer_types, self.ignore_sliding_window)


class AttentionTransfer(nn.Module):
    """The stage-1 model for `Trainer`: `forward` returns the mean per-layer attention-transfer MSE as `loss` and the
    per-layer values as `layer_mse` `(batch, linear layers)` (gathered by evaluation; kept attention layers are
    skipped). The student is a submodule (so the Trainer, DDP included, sees its trainable mixers); the teacher is
    kept out of the parameters."""

    accepts_loss_kwargs = False  # a per-batch mean: the Trainer divides it for gradient accumulation

    def __init__(self, student: PreTrainedModel, teacher: PreTrainedModel):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a registered submodule

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None):
        layer_mse = attention_transfer_loss(self.student, self._teacher[0], input_ids, attention_mask)
        return {"loss": layer_mse.mean(), "layer_mse": layer_mse.detach()[None].expand(input_ids.shape[0], -1)}


def _layer_mse_metrics(prediction, layers: list[int]) -> dict[str, float]:
    """`mse_layer_{i}` per linear block `i` (`layers`, the columns of `layer_mse`)."""
    per_layer = np.asarray(prediction.predictions, dtype=np.float64).reshape(-1, np.shape(prediction.predictions)[-1])
    return {f"mse_layer_{i}": float(v) for i, v in zip(layers, per_layer.mean(0), strict=True)}


def _per_layer(metrics: dict[str, float]) -> list[float]:
    """`stage1_mse_layer_{i}` values in layer order."""
    keys = [k for k in metrics if "_mse_layer_" in k]
    return [metrics[k] for k in sorted(keys, key=lambda k: int(k.rsplit("_", 1)[-1]))]


def _stage_args(training_args: TrainingArguments, **changes: Any) -> TrainingArguments:
    """A copy of the run's TrainingArguments for an auxiliary Trainer (no saving, no reporting)."""
    return dataclasses.replace(
        training_args, save_strategy="no", eval_strategy="no", load_best_model_at_end=False, report_to="none",
        push_to_hub=False, resume_from_checkpoint=None, **changes,
    )  # fmt: skip


def stage1_parameters(student: PreTrainedModel, train: str = "mixer") -> list[str]:
    """Names of the parameters stage 1 trains: those of the linear layers' mixers (`train="mixer"`), or only the
    ones the teacher lacks (`"new"`: not the copied q/k/v/o). Kept attention layers are the teacher's own: frozen
    (they take no part in the transfer loss, and a trainable unused parameter would also trip DDP)."""
    copied = ("q_proj", "k_proj", "v_proj", "o_proj")
    mixers = tuple(f".layers.{i}.mixer." for i in linear_layer_indices(student.config))
    return [
        name
        for name, _ in student.named_parameters()
        if any(m in f".{name}" for m in mixers) and not (train == "new" and any(f".{c}." in name for c in copied))
    ]


def run_attention_transfer(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    train_dataset,
    eval_dataset,
    collator,
    training_args: TrainingArguments,
    steps: int,
    learning_rate: float,
    train: str = "mixer",
) -> dict[str, Any]:
    """Stage 1 on a `Trainer`: train the student's linear mixers (`train="mixer"`) or their new parameters only
    (`"new"`) to reproduce the teacher's attention outputs for `steps` steps; everything else, the attention layers a
    hybrid student kept included (they are the teacher's layers), is frozen, then unfrozen again.
    Returns the eval mean and per-layer MSE before and after, over the linear layers (`stage1_layers`, block
    indices; kept attention layers are not reported)."""
    linear = linear_layer_indices(student.config)
    if not linear:
        raise ConfigError(
            "stage 1 (attention transfer) has nothing to train: every layer of `layer_types` is softmax attention, "
            "copied exactly from the teacher; set stage1_steps: 0"
        )
    trainable = {name: param.requires_grad for name, param in student.named_parameters()}
    trained = set(stage1_parameters(student, train))
    for name, param in student.named_parameters():
        param.requires_grad_(name in trained)
    args = _stage_args(
        training_args,
        output_dir=str(Path(training_args.output_dir) / "stage1"),
        max_steps=steps,
        learning_rate=learning_rate,
        warmup_steps=min(training_args.warmup_steps, steps // 10),
        prediction_loss_only=False,
    )
    trainer = Trainer(
        model=AttentionTransfer(student, teacher),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        compute_metrics=functools.partial(_layer_mse_metrics, layers=linear),
    )
    try:
        before = trainer.evaluate(metric_key_prefix="stage1")
        result = trainer.train()
        after = trainer.evaluate(metric_key_prefix="stage1")
    finally:
        for name, param in student.named_parameters():
            param.requires_grad_(trainable[name])
        if Path(args.output_dir).is_dir() and not any(Path(args.output_dir).iterdir()):
            Path(args.output_dir).rmdir()  # nothing saved there (save_strategy "no")
    return {
        "stage1_steps": steps,
        "stage1_layers": linear,
        "stage1_initial_mse": before["stage1_loss"],
        "stage1_final_mse": after["stage1_loss"],
        "stage1_initial_layer_mse": _per_layer(before),
        "stage1_final_layer_mse": _per_layer(after),
        "stage1_train_loss": result.training_loss,
        "stage1_train_runtime_s": result.metrics.get("train_runtime"),
    }


class DistillationTrainer(Trainer):
    """`Trainer` whose training loss is the model's next-token loss plus `kl_weight * T^2 KL(teacher_T || model_T)`
    over the labelled positions. Evaluation reports the next-token loss alone (comparable with any causal LM).

    The KL term follows the LM loss's normalisation: divided by the accumulated label count `num_items_in_batch`
    when the model takes it (our heads do), a per-batch mean otherwise, so gradient accumulation stays exact.
    """

    def __init__(self, *args, teacher: PreTrainedModel | None = None, kl_weight: float = 0.0,
                 temperature: float = 1.0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if kl_weight > 0 and teacher is None:
            raise ConfigError("kl_weight > 0 needs a teacher")
        self.teacher = teacher.to(self.args.device).eval() if teacher is not None else None
        self.kl_weight = kl_weight
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.kl_weight > 0 and model.training:
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
                ).logits
            by_count = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            kl = kl_to_teacher(
                outputs["logits"], teacher_logits, inputs.get("labels"), self.temperature, "sum" if by_count else "mean"
            )
            if by_count:
                kl = kl / num_items_in_batch
                if self.args.average_tokens_across_devices:  # as Trainer scales the LM loss
                    kl = kl * self.accelerator.num_processes
            loss = loss + self.kl_weight * kl.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


class LinearizeTask(CausalLMTask):
    """Linearize a teacher Transformer into `into` and train it in two stages (see the module docstring)."""

    name = "linearize"
    arguments = LinearizeArguments
    auto_model = AutoModelForCausalLM
    trainer_class = DistillationTrainer
    model_type_key: ClassVar[str | None] = "into"
    result_metrics = (("eval loss", "eval_loss"), ("perplexity", "eval_perplexity"))

    def __init__(self):
        self.teacher: PreTrainedModel | None = None

    def default_tokenizer(self, task_args: LinearizeArguments) -> str | None:
        """The teacher folder's tokenizer when it has one (else hf_extras' byte tokenizer)."""
        path = task_args.teacher_model_name_or_path
        return path if path and (Path(path) / "tokenizer_config.json").is_file() else None

    def load_teacher(self, task_args: LinearizeArguments) -> PreTrainedModel:
        path = task_args.teacher_model_name_or_path
        if not path:
            raise ConfigError("task linearize needs `teacher_model_name_or_path` (a folder saved by transformers)")
        if not Path(path).is_dir():
            raise ConfigError(f"teacher_model_name_or_path {path!r} is not a folder (the teacher loads offline)")
        try:
            teacher = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"teacher_model_name_or_path {path!r} does not load as a causal LM: {error}") from error
        teacher.requires_grad_(False)
        return teacher.eval()

    def build_model(self, task_args: LinearizeArguments, model_type: str, overrides: dict[str, Any], tokenizer):
        if task_args.into is not None and task_args.into != model_type:
            raise ConfigError(f"into={task_args.into!r} and model_type={model_type!r} disagree: set one of them")
        self.teacher = self.load_teacher(task_args)
        if self.teacher.config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"the teacher's vocab_size ({self.teacher.config.vocab_size}) is smaller than the tokenizer "
                f"({len(tokenizer)} tokens): use the teacher's own tokenizer (tokenizer_name)"
            )
        return linearize(
            self.teacher,
            into=model_type,
            layer_types=task_args.layer_types,
            decay_horizons=tuple(task_args.decay_horizons),
            ignore_sliding_window=task_args.ignore_sliding_window,
            **overrides,
        ).train()

    def before_training(self, task_args, model, train_dataset, eval_dataset, collator, training_args):
        """Teacher and copy evaluation, then stage 1; sets stage 2's length. Returns metrics for metrics.json."""
        if task_args.stage2_steps is not None:
            if training_args.max_steps > 0 and training_args.max_steps != task_args.stage2_steps:
                raise ConfigError(
                    f"stage2_steps ({task_args.stage2_steps}) and max_steps ({training_args.max_steps}) disagree: "
                    "set one of them"
                )
            training_args.max_steps = task_args.stage2_steps
        eval_args = _stage_args(training_args, output_dir=str(Path(training_args.output_dir) / "stage1"))
        teacher_eval = Trainer(model=self.teacher, args=eval_args, eval_dataset=eval_dataset, data_collator=collator)
        copy_eval = Trainer(model=model, args=eval_args, eval_dataset=eval_dataset, data_collator=collator)
        metrics = {
            "teacher_eval_loss": teacher_eval.evaluate()["eval_loss"],
            "linearized_eval_loss": copy_eval.evaluate()["eval_loss"],
        }
        if task_args.stage1_steps > 0 and not linear_layer_indices(model.config):
            metrics.update(stage1_steps=0, stage1_layers=[])  # every layer is the teacher's attention: nothing to learn
        elif task_args.stage1_steps > 0:
            metrics.update(
                run_attention_transfer(
                    model, self.teacher, train_dataset, eval_dataset, collator, training_args,
                    task_args.stage1_steps, task_args.stage1_learning_rate, task_args.stage1_train,
                )
            )  # fmt: skip
        scratch = Path(eval_args.output_dir)
        if scratch.is_dir() and not any(scratch.iterdir()):
            scratch.rmdir()
        return metrics

    def trainer_kwargs(self, task_args: LinearizeArguments) -> dict[str, Any]:
        return {"teacher": self.teacher, "kl_weight": task_args.kl_weight, "temperature": task_args.temperature}
