"""One training run behind `hf-extras train`: the run's arguments, its building blocks and the run itself.

The run is the same for every task and every `model_type`: tokenizer -> data -> config -> model -> evaluate the
untrained model -> HF `Trainer` -> evaluate -> write a run folder (model + remote code, tokenizer, `metrics.json`,
`loss_curve.png`, model card `README.md`) that `AutoModel*.from_pretrained` and `AutoTokenizer.from_pretrained`
load. What differs per task (data preparation, collator, head, derived metrics, a qualitative sample) sits behind
the small `Task` interface of `hf_extras.tasks.base`, where tasks are registered by name (`TASKS`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .errors import ConfigError
from .tasks.base import DEFAULT_TASK, TASKS, DataArguments, Task, did_you_mean, get_task
from .tasks.causal_lm import CausalLMArguments, CausalLMTask

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "CausalLMArguments",
    "CausalLMTask",
    "ConfigError",
    "DataArguments",
    "RunArguments",
    "Task",
    "build_config",
    "get_task",
    "load_tokenizer",
    "check_output_dir",
    "last_complete_checkpoint",
    "plot_loss_curve",
    "resolve_resume_checkpoint",
    "run",
]  # Task, TASKS, get_task, DataArguments and CausalLM*: defined in hf_extras.tasks, kept importable from here


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunArguments:
    """Everything one run needs, as parsed by `hf_extras.cli`."""

    data: DataArguments
    task: Any  # the task's own arguments dataclass (`Task.arguments`)
    model_type: str
    model_overrides: dict[str, Any]  # config fields set explicitly in YAML or on the command line
    training: TrainingArguments
    finetune: Any = None  # hf_extras.finetune.FinetuneArguments; None = full fine-tuning


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def config_class_for(model_type: str) -> type[PreTrainedConfig]:
    """The config class registered for `model_type`, or a ConfigError naming the closest known type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        hfx = sorted(k for k in CONFIG_MAPPING if k.startswith("hfx_"))
        raise ConfigError(
            f"unknown model_type {model_type!r}{did_you_mean(model_type, CONFIG_MAPPING)}; "
            f"hf_extras families: {', '.join(hfx)}"
        ) from None


def build_config(model_type: str, values: dict[str, Any]) -> PreTrainedConfig:
    """Build and validate the config; the config's own validation message becomes a ConfigError."""
    from huggingface_hub.errors import StrictDataclassError

    config_class_for(model_type)
    try:
        return AutoConfig.for_model(model_type, **values)
    except (StrictDataclassError, ValueError, TypeError) as error:
        raise ConfigError(f"invalid {model_type} config: {error}") from error


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    """hf_extras' offline byte tokenizer, or any AutoTokenizer (given a pad token for batching)."""
    if name_or_path is None:
        from .data.tokenizer import build_byte_tokenizer

        return build_byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_checkpoint_config(path: str) -> PreTrainedConfig:
    """The config of the model to fine-tune (`model_name_or_path`), or a ConfigError naming the path."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model_name_or_path {path!r} is not a loadable model folder or name: {error}") from error


def pretrained_config_values(path: str, model_type: str) -> dict[str, Any]:
    """The config of a saved model folder as keyword values (bookkeeping keys dropped), checked against
    `model_type`; explicit model keys and the task's defaults are laid over it."""
    config = load_checkpoint_config(path)
    if config.model_type != model_type:
        raise ConfigError(
            f"model_name_or_path {path!r} holds a {config.model_type!r} model but model_type is {model_type!r}: "
            "drop model_type (it is read from the checkpoint) or pick a matching checkpoint"
        )
    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"):
        values.pop(key, None)
    return values


def _load_checkpoint(auto_model: Any, path: str, config: PreTrainedConfig, base: dict, overrides: dict) -> Any:
    """`auto_model.from_pretrained(path, config=config)`; weights whose shape the config changed are an error naming
    the overriding keys (fine-tuning must not start from re-initialised weights)."""
    changed = {k: f"{base[k]} -> {v}" for k, v in overrides.items() if k in base and base[k] != v}
    try:
        model, loading = auto_model.from_pretrained(path, config=config, output_loading_info=True)
    except RuntimeError as error:  # transformers refuses mismatched shapes unless ignore_mismatched_sizes
        if "mismatched" not in str(error):
            raise
        loading = {"mismatched_keys": ["(see the load report above)"]}
    mismatched = loading.get("mismatched_keys") or []
    if mismatched:
        raise ConfigError(
            f"weights of {path} do not fit the model ({len(mismatched)} mismatched, e.g. {list(mismatched)[:3]}): "
            f"the model keys {changed} change its shapes; drop them to fine-tune the checkpoint as it is"
        )
    return model


def tokenizer_config_defaults(config_class: type, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Vocabulary size (rounded up to a multiple of 8) and special-token ids that match the tokenizer."""
    values = {
        "vocab_size": -(-len(tokenizer) // 8) * 8,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    names = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in values.items() if k in names}


def check_output_dir(output_dir: str | Path) -> None:
    """Create `output_dir` and write a scratch file there, so an unwritable folder fails before anything loads
    (otherwise it is found at the final save, after the whole training run)."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(
            f"output_dir {str(output_dir)!r} is not writable ({error.strerror or error}): pick another output_dir"
        ) from error


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _is_complete_checkpoint(folder: Path) -> bool:
    """`Trainer` writes `trainer_state.json` last (after the weights and the optimizer): a checkpoint a kill cut short
    lacks it, or lacks the weights."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(p.suffix in _WEIGHT_SUFFIXES or p.name.startswith("pytorch_model_fsdp") for p in folder.iterdir())


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The `checkpoint-N` folder of `output_dir` with the highest N that is complete (see `_is_complete_checkpoint`);
    None when there is none."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = {int(m.group(1)): p for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))}
    return next((steps[n] for n in sorted(steps, reverse=True) if _is_complete_checkpoint(steps[n])), None)


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> str | None:
    """`resume_from_checkpoint` as `Trainer.train` takes it: unset or `false` -> None (start fresh); `true` -> the last
    complete checkpoint in `output_dir`; anything else -> that checkpoint folder, which must exist and be complete."""
    if value is None or value.strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if value.strip().lower() in ("true", "yes", "1"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ConfigError(
                f"resume_from_checkpoint=true but output_dir {str(output_dir)!r} holds no complete checkpoint-N folder "
                "(with trainer_state.json and weights): drop resume_from_checkpoint or name a checkpoint folder"
            )
        return str(found)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint {value!r} does not exist or is not a folder")
    if not _is_complete_checkpoint(path):
        raise ConfigError(
            f"resume_from_checkpoint {value!r} is not a complete Trainer checkpoint (no trainer_state.json or no "
            "weights: a run killed while saving leaves such a folder); name an earlier checkpoint or use `true`"
        )
    return str(path)


def plot_loss_curve(log_history: list[dict[str, Any]], path: str | Path) -> None:
    """Train and eval loss against the optimizer step, from `trainer.state.log_history`, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves the global matplotlib backend alone

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _eval_summary(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """`eval_loss` -> `<prefix>_eval_loss` etc., dropping throughput and bookkeeping numbers."""
    noise = ("_per_second", "_model_preparation_time")
    return {f"{prefix}_{k}": v for k, v in metrics.items() if k.startswith("eval_") and not k.endswith(noise)}


def default_find_unused_parameters(training_args: TrainingArguments, config: PreTrainedConfig) -> None:
    """Let DDP search for parameters without gradient only where a step can leave some unused.

    Only MoE feed-forwards do (experts no token was routed to); the search costs a graph walk every step, and the
    Trainer's own default (on unless gradient checkpointing) is off exactly when an MoE model needs it. An explicit
    `ddp_find_unused_parameters` is kept.
    """
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = getattr(config, "ffn_type", None) == "moe"


def evaluate_before_training(trainer: Trainer) -> dict[str, float]:
    """`trainer.evaluate()` on the untrained model, leaving the model unprepared so that `train()` still wraps it.

    `evaluate()` before `train()` prepares the model for evaluation and accelerate (>= 1.14) marks it prepared; its
    `prepare()` in `train()` then returns it without the DDP wrapper, and every process trains its own copy on its
    shard of the batch (the logged loss, averaged over processes, hides it). Dropping the mark and the accelerator's
    references restores the wrap; `tests/test_distributed.py` checks the loss against one process.
    """
    metrics = trainer.evaluate()
    if trainer.args.world_size > 1:
        trainer.accelerator.free_memory()
        trainer.model.__dict__.pop("_is_accelerate_prepared", None)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def run(args: RunArguments) -> dict[str, Any]:
    """Train one model and write its run folder to `args.training.output_dir`; returns the metrics."""
    from .data.tokenizer import tokenizer_for_task
    from .model_card import ModelCardInfo, write_model_card

    start = time.perf_counter()
    task = get_task(args.data.task)
    training_args = args.training
    # checked before anything loads: a bad folder must not cost a data load and a training run
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir)
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    set_seed(training_args.seed)

    pretrained = args.data.model_name_or_path
    tokenizer = load_tokenizer(args.data.tokenizer_name or pretrained or task.default_tokenizer(args.task))
    tokenizer = tokenizer_for_task(tokenizer, task.name)  # byte tokenizer: cls/sep for encoder tasks only
    config_class = config_class_for(args.model_type)
    raw = task.load_data(args.data, data_seed)
    custom_model = task.build_model(args.task, args.model_type, args.model_overrides, tokenizer)
    base = pretrained_config_values(pretrained, args.model_type) if pretrained and custom_model is None else {}
    config = (
        custom_model.config
        if custom_model is not None
        else build_config(
            args.model_type,
            {
                **(base or tokenizer_config_defaults(config_class, tokenizer)),
                **task.config_defaults(args.task, tokenizer, raw),
                **args.model_overrides,
            },
        )
    )
    if getattr(config, "vocab_size", None) is not None and config.vocab_size < len(tokenizer):
        fix = "use the checkpoint's own tokenizer (unset tokenizer_name)" if pretrained else "raise vocab_size"
        raise ConfigError(
            f"vocab_size ({config.vocab_size}) is smaller than the tokenizer ({len(tokenizer)} tokens): {fix}"
        )
    if pretrained and custom_model is None and config.vocab_size != base["vocab_size"]:
        raise ConfigError(
            f"vocab_size {config.vocab_size} differs from the checkpoint's {base['vocab_size']} ({pretrained}): its "
            "embeddings cannot load; drop the vocab_size override"
        )
    try:
        if custom_model is not None:
            model = custom_model
        elif pretrained:
            model = _load_checkpoint(task.auto_model, pretrained, config, base, args.model_overrides)
        else:
            model = task.auto_model.from_config(config)
    except ValueError as error:  # head-dependent rules live in the model's __init__ (e.g. no bidirectional LM)
        raise ConfigError(f"invalid {args.model_type} config for task {task.name!r}: {error}") from error

    from .finetune import FinetuneArguments, apply_finetune_method, save_finetuned

    default_find_unused_parameters(training_args, config)
    finetune = args.finetune or FinetuneArguments()

    data = task.prepare(args.task, tokenizer, raw, args.data.preprocessing_num_workers)
    train_dataset = task.subset(data["train"], args.data.max_train_samples, data_seed)
    eval_dataset = task.subset(data["validation"], args.data.max_eval_samples, data_seed)
    if len(train_dataset) == 0 or len(eval_dataset) == 0:
        raise ConfigError(
            f"no examples after preprocessing (train={len(train_dataset)}, validation={len(eval_dataset)}): "
            "use more data or a smaller block_size"
        )
    collator = task.collator(args.task, tokenizer)
    # a task's own first stage (e.g. linearize's attention transfer) trains the model before the method wraps it
    stage_metrics = task.before_training(args.task, model, train_dataset, eval_dataset, collator, training_args)
    model, finetune_counts = apply_finetune_method(model, finetune, training_args.output_dir, training_args.should_save)

    trainer = task.trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=task.processing_class(args.task, tokenizer, config),
        compute_metrics=task.metrics_function(args.task, eval_dataset),
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
        **task.trainer_kwargs(args.task),
    )
    initial = task.derived_metrics(evaluate_before_training(trainer))
    train_result = trainer.train(resume_from_checkpoint=resume)
    # train() starts a fresh TrainerState: put the untrained evaluation back at step 0 of the history
    trainer.state.log_history.insert(0, {**initial, "step": 0})
    final = task.derived_metrics(trainer.evaluate())

    output_dir = Path(training_args.output_dir)
    if finetune.finetune_method == "full":
        trainer.save_model(str(output_dir))  # model (+ remote code via auto_map) and tokenizer
    elif trainer.is_world_process_zero():  # the adapter (+ head) and tokenizer, reloadable with load_finetuned
        save_finetuned(trainer.model, output_dir, finetune, trainer.processing_class)
    trainer.save_state()
    sample = task.sample(args.task, model, tokenizer)

    state = trainer.state
    metrics: dict[str, Any] = {
        "task": task.name,
        "model_type": args.model_type,
        "num_parameters": model.num_parameters(),
        **finetune_counts,
        **stage_metrics,
        **_eval_summary("initial", initial),
        **_eval_summary("final", final),
        "train_loss": train_result.training_loss,
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": int(state.num_input_tokens_seen),
        "train_samples": len(train_dataset),
        "eval_samples": len(eval_dataset),
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "total_runtime_s": round(time.perf_counter() - start, 2),
        "device": str(training_args.device),
        "sample": sample,
    }
    if trainer.is_world_process_zero():
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        plot_loss_curve(state.log_history, output_dir / "loss_curve.png")
        write_model_card(
            output_dir,
            ModelCardInfo(
                config=config,
                task=task.name,
                pipeline_tag=task.pipeline_tag,
                auto_class=task.auto_model.__name__,
                num_parameters=metrics["num_parameters"],
                data=_describe_data(args.data, raw, len(train_dataset), len(eval_dataset)),
                datasets=[args.data.dataset_name]
                if args.data.dataset_name and not Path(args.data.dataset_name).exists()
                else [],
                training=_describe_training(training_args, args.task, metrics),
                results=[(label, initial.get(key), final.get(key)) for label, key in task.result_metrics],
                train_loss=metrics["train_loss"],
                sample=sample,
                loss_curve="loss_curve.png",
            ),
        )
    if sample:
        print(f"\nsample ({sample['decoding']}):\n{sample['prompt']}{sample['completion']}\n")
    print(
        "results (untrained -> trained): "
        + ", ".join(f"{label}: {initial.get(key):.4g} -> {final.get(key):.4g}" for label, key in task.result_metrics)
        + f"; run folder: {output_dir}"
    )
    return metrics


def _describe_data(data_args: DataArguments, raw: DatasetDict, n_train: int, n_eval: int) -> str:
    source = (
        f"`{data_args.dataset_name}`"
        if data_args.dataset_name
        else "The embedded offline corpus (the Python standard library's source and `pydoc_data` topics)"
    )
    return (
        f"{source}: {len(raw['train'])} train / {len(raw['validation'])} validation documents, "
        f"used as {n_train} train / {n_eval} validation examples."
    )


def _describe_training(training_args: TrainingArguments, task_args: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    scheduler = training_args.lr_scheduler_type
    rows = {
        "optimizer steps": metrics["steps"],
        "batch size (per device x accumulation)": batch,
        "learning rate": training_args.learning_rate,
        "schedule": f"{getattr(scheduler, 'value', scheduler)}, warmup {training_args.warmup_steps}",
        "weight decay": training_args.weight_decay,
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        "tokens seen": metrics["tokens_seen"] or None,
        "train runtime (s)": metrics["train_runtime_s"],
        "device": metrics["device"],
        "seed": training_args.seed,
    }
    rows.update({k: v for k, v in dataclasses.asdict(task_args).items() if not k.startswith("sample_")})
    return rows
