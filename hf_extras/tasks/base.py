"""The task protocol and registry: what a task adds to the generic `hf-extras train` run, and where to find it.

A task module under `hf_extras/tasks/` holds its preprocessing, collator and metrics as plain functions, plus a
`Task` subclass that wires them into the run (`hf_extras.training.run`). Tasks are looked up by name in `TASKS`
(`"name": "module:Class"`, imported on first use, so a task's dependencies load only when it runs): a new task is
one module plus one entry. `DataArguments` (which task, which data, which tokenizer) is shared by every task.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..data.corpus import load_text_dataset
from ..errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

__all__ = ["DEFAULT_TASK", "TASKS", "DataArguments", "Task", "did_you_mean", "get_task", "seeded_subset"]

DEFAULT_TASK = "causal_lm"


@dataclass
class DataArguments:
    """Which task to run, on which data and tokenizer (shared by every task)."""

    _argument_group_name = "task and data"

    task: str = field(default=DEFAULT_TASK, metadata={"help": "Task to train (see hf_extras.tasks.base.TASKS)."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "datasets Hub name, builder name, local file or folder; unset = embedded offline corpus."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "datasets config name."})
    data_files: list[str] | None = field(default=None, metadata={"help": "data_files for datasets.load_dataset."})
    text_column: str = field(default="text", metadata={"help": "Column holding the input text."})
    validation_fraction: float = field(
        default=0.02, metadata={"help": "Share of documents held out when the data has no validation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep this many training examples (after preprocessing; seeded subset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep this many validation examples (after preprocessing; seeded subset)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "AutoTokenizer name or path; unset = the checkpoint's tokenizer (model_name_or_path) or else "
            "hf_extras' offline byte tokenizer."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Fine-tune from this saved model folder (e.g. a `hf-extras train` run): its weights load into the "
            "task's head (new head weights are initialised), model keys set here override its config; unset = train "
            "from scratch."
        },
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})


class Task:
    """What a task adds to the generic run. Subclass, then add `"name": "module:Class"` to `TASKS`.

    A task module under `hf_extras/tasks/` holds the preprocessing, collator and metrics; its `Task` subclass
    only wires them into the run.
    """

    name: ClassVar[str]
    arguments: ClassVar[type]  # dataclass of the task's own options, parsed with the others
    auto_model: ClassVar[type]  # e.g. AutoModelForCausalLM
    pipeline_tag: ClassVar[str]  # Hub pipeline tag for the model card
    training_defaults: ClassVar[dict[str, Any]] = {}  # TrainingArguments defaults; YAML and CLI override them
    trainer_class: ClassVar[type] = Trainer  # e.g. Seq2SeqTrainer (generation during evaluation)
    training_arguments_class: ClassVar[type] = TrainingArguments  # parsed from YAML/CLI; e.g. Seq2SeqTrainingArguments
    result_metrics: ClassVar[tuple[tuple[str, str], ...]] = (("eval loss", "eval_loss"),)  # (label, key) for card

    def load_data(self, data_args: DataArguments, seed: int) -> DatasetDict:
        """Raw `train`/`validation` splits (default: text data through `hf_extras.data.load_text_dataset`)."""
        return load_text_dataset(
            data_args.dataset_name,
            text_column=data_args.text_column,
            validation_fraction=data_args.validation_fraction,
            data_files=data_args.data_files,
            config_name=data_args.dataset_config_name,
            seed=seed,
        )

    def config_defaults(self, task_args: Any, tokenizer: PreTrainedTokenizerBase, raw: DatasetDict) -> dict[str, Any]:
        """Config values the task derives from its data (e.g. `num_labels`); explicit settings still win."""
        return {}

    def prepare(
        self, task_args: Any, tokenizer: PreTrainedTokenizerBase, raw: DatasetDict, num_proc: int | None
    ) -> DatasetDict:
        """Model-ready splits."""
        raise NotImplementedError

    def collator(self, task_args: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
        """The `Trainer` data collator."""
        raise NotImplementedError

    compute_metrics: ClassVar[Any] = None  # optional `Trainer(compute_metrics=...)`
    preprocess_logits_for_metrics: ClassVar[Any] = None  # optional: shrink logits (e.g. to arg-max ids) per batch

    def metrics_function(self, task_args: Any, eval_dataset: Dataset) -> Any:
        """`Trainer(compute_metrics=...)` for this evaluation set (default: `compute_metrics`; QA needs the set)."""
        return self.compute_metrics

    def subset(self, dataset: Dataset, limit: int | None, seed: int) -> Dataset:
        """`max_train_samples` / `max_eval_samples`: a seeded subset of `limit` prepared examples."""
        return seeded_subset(dataset, limit, seed)

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add metrics computed from `Trainer.evaluate()`'s output (e.g. perplexity from the loss)."""
        return metrics

    def processing_class(self, task_args: Any, tokenizer: PreTrainedTokenizerBase, config: PreTrainedConfig) -> Any:
        """What `Trainer` saves beside the model in the run folder (default: the tokenizer; images: a processor)."""
        return tokenizer

    def sample(self, task_args: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict | None:
        """A small qualitative example from the trained model, saved into metrics.json and the card."""
        return None

    # --- hooks for tasks that build their model themselves or train in stages (e.g. linearize); defaults: none ---

    model_type_key: ClassVar[str | None] = None  # a task argument that also selects `model_type` (linearize: "into")

    def default_tokenizer(self, task_args: Any) -> str | None:
        """Tokenizer name or folder when neither `tokenizer_name` nor `model_name_or_path` gives one (None: bytes)."""
        return None

    def build_model(
        self, task_args: Any, model_type: str, overrides: dict[str, Any], tokenizer: PreTrainedTokenizerBase
    ) -> PreTrainedModel | None:
        """The model to train, built by the task (e.g. copied from a teacher); None = the run builds it from the
        config (or `model_name_or_path`)."""
        return None

    def before_training(
        self,
        task_args: Any,
        model: PreTrainedModel,
        train_dataset: Dataset,
        eval_dataset: Dataset,
        collator: Any,
        training_args: TrainingArguments,
    ) -> dict[str, Any]:
        """Work before the main Trainer is built (e.g. a first training stage); returns metrics for metrics.json."""
        return {}

    def trainer_kwargs(self, task_args: Any) -> dict[str, Any]:
        """Extra keyword arguments for `trainer_class` (e.g. a teacher to distil from)."""
        return {}


# name -> "module:attribute" (resolved lazily, so a task's dependencies load only when it runs)
TASKS: dict[str, str] = {
    "causal_lm": "hf_extras.tasks.causal_lm:CausalLMTask",
    "image_classification": "hf_extras.tasks.image_classification:ImageClassificationTask",
    "masked_lm": "hf_extras.tasks.masked_lm:MaskedLMTask",
    "sequence_classification": "hf_extras.tasks.sequence_classification:SequenceClassificationTask",
    "token_classification": "hf_extras.tasks.token_classification:TokenClassificationTask",
    "question_answering": "hf_extras.tasks.question_answering:QuestionAnsweringTask",
    "seq2seq": "hf_extras.tasks.seq2seq:Seq2SeqTask",
    "linearize": "hf_extras.tasks.linearize:LinearizeTask",
}


def get_task(name: str) -> Task:
    """Instantiate the registered task `name`; unknown names fail with the closest valid one."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; available: {', '.join(sorted(TASKS))}")
    module_name, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module_name), attribute)()


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `candidates`, or an empty string."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def seeded_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of `limit` rows (a prefix would only see the first documents of the corpus)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))
