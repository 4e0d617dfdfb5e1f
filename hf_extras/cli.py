"""The `hf-extras` command: `hf-extras train CONFIG.yaml [--key value | --key=value ...]` and `hf-extras bench`.

Arguments come from four `HfArgumentParser` dataclasses: `DataArguments` (task and data), the task's own
arguments (e.g. `block_size`), a model dataclass generated from the chosen `model_type`'s config fields, and
`transformers.TrainingArguments`. The YAML file is a flat mapping of the same keys. It is turned into
`--key=value` arguments and parsed together with the command line, YAML first, so the last value wins
(transformers has no YAML-plus-overrides mode). Unknown keys fail before anything is loaded, naming the key and
the closest valid one; values are converted by the field's type (YAML `0` for a float field is `0.0`), and the
model config is validated at parse time, so its own message names a bad field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from transformers import HfArgumentParser, PreTrainedConfig

from .errors import ConfigError
from .finetune import FinetuneArguments
from .tasks.base import DEFAULT_TASK, DataArguments, get_task
from .training import RunArguments, build_config, config_class_for, load_checkpoint_config

__all__ = ["build_parser", "main", "model_arguments_class", "parse_train_args", "yaml_to_args"]

DEFAULT_MODEL_TYPE = "hfx_retnet"
_BASE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(PreTrainedConfig))
_SIMPLE_TYPES = (int, float, str, bool)


class _RaiseOnError(argparse.ArgumentParser):
    """Raise ConfigError instead of exiting; never guess abbreviated keys (`--hidden` is not `--hidden_size`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # argparse calls this for every parse error
        raise ConfigError(message)


class _Parser(_RaiseOnError, HfArgumentParser):
    """HfArgumentParser with `_RaiseOnError`'s behaviour."""


def _yaml_value(text: str) -> Any:
    """Argument type for config fields argparse cannot type (unions, dicts): read the text as YAML."""
    return yaml.safe_load(text)


def _argument_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """Map a config field's type to (dataclass annotation, extra argparse kwargs) that HfArgumentParser handles.

    Every model argument is optional (default None = "use the config's default"), so the run knows which
    fields were set explicitly and can fill the rest (vocab size, token ids) from the tokenizer.
    """
    if typing.get_origin(annotation) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else _yaml_value
    origin = typing.get_origin(annotation)
    simple = annotation in _SIMPLE_TYPES or origin is Literal
    simple_list = origin is list and all(a in _SIMPLE_TYPES for a in typing.get_args(annotation))
    if not (simple or simple_list):
        return _yaml_value, {}
    extra = {"nargs": "?", "const": True} if annotation is bool else {}  # `--flag` alone means true
    return annotation | None, extra


def _resolve_annotation(config_class: type, f: dataclasses.Field) -> Any:
    """One field's type, evaluated in the module of the class that declares it.

    Per field because `typing.get_type_hints` resolves every field at once and fails on transformers' own
    `dtype: "torch.dtype"` (imported only for type checkers); an unresolvable type is parsed as YAML.
    """
    if not isinstance(f.type, str):
        return f.type
    owner = next(c for c in config_class.__mro__ if f.name in inspect.get_annotations(c))
    try:
        return eval(f.type, dict(vars(sys.modules[owner.__module__])))  # what get_type_hints does, per field
    except (NameError, AttributeError, SyntaxError, TypeError):
        return Any


def model_arguments_class(model_type: str, reserved: set[str] = frozenset()) -> type:
    """A dataclass with `model_type` plus one optional argument per field of that model_type's config.

    Fields of transformers' base `PreTrainedConfig` (dtype, id2label, ...) and names in `reserved` (those another
    argument dataclass owns, e.g. TrainingArguments' `use_cache`) are left out.
    """
    config_class = config_class_for(model_type)
    if not dataclasses.is_dataclass(config_class):
        raise ConfigError(f"model_type {model_type!r} ({config_class.__name__}) has no dataclass config to parse")
    fields: list[tuple[str, Any, Any]] = [
        (
            "model_type",
            str,
            dataclasses.field(default=model_type, metadata={"help": "Model family (config model_type)."}),
        )
    ]
    for f in dataclasses.fields(config_class):
        if not f.init or f.name in _BASE_CONFIG_FIELDS or f.name in reserved:
            continue
        annotation, extra = _argument_type(_resolve_annotation(config_class, f))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        # `%(default).0s` prints nothing: it keeps argparse from appending the sentinel "(default: None)"
        help_text = f"{config_class.__name__}.{f.name} (config default: {default!r})%(default).0s"
        aliases = [
            f"--{a}" for a, target in config_class.attribute_map.items() if target == f.name and a not in reserved
        ]
        metadata = {"help": help_text, "aliases": aliases, **extra}  # e.g. --num_attention_heads for --num_heads
        fields.append((f.name, annotation, dataclasses.field(default=None, metadata=metadata)))
    return dataclasses.make_dataclass(
        f"{config_class.__name__}Arguments", fields, namespace={"_argument_group_name": f"model ({model_type})"}
    )


def build_parser(model_type: str, task_name: str) -> HfArgumentParser:
    """The parser for one (model_type, task) pair: data, task, generated model and training arguments."""
    task = get_task(task_name)
    others = (DataArguments, task.arguments, FinetuneArguments, task.training_arguments_class)
    reserved = {f.name for dtype in others for f in dataclasses.fields(dtype)}
    model_arguments = model_arguments_class(model_type, reserved)
    if config_class_for(model_type) not in task.auto_model._model_mapping:
        raise ConfigError(f"model_type {model_type!r} has no {task.auto_model.__name__} head for task {task_name!r}")
    parser = _Parser(
        [DataArguments, task.arguments, model_arguments, FinetuneArguments, task.training_arguments_class],
        prog="hf-extras train",
        description=f"Train a {model_type} model on the {task_name} task (YAML keys and --key value pairs).",
    )
    return parser


def _unknown_key(key: str, parser: argparse.ArgumentParser, where: str) -> ConfigError:
    options = [o[2:] for o in parser._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint} (see `hf-extras train --help` for the valid keys)")


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def yaml_to_args(
    mapping: dict[str, Any], parser: argparse.ArgumentParser, source: str = "the YAML config"
) -> list[str]:
    """Turn a flat YAML mapping into `--key=value` arguments for `parser`, rejecting unknown keys.

    `null` means "keep the default". Lists go to list-typed fields as several values and elsewhere as JSON,
    like mappings (TrainingArguments parses its dict fields from JSON).
    """
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source} must be a mapping of key: value pairs, got {type(mapping).__name__}")
    args: list[str] = []
    for key, value in mapping.items():
        action = parser._option_string_actions.get(f"--{key}")
        if action is None:
            raise _unknown_key(str(key), parser, source)
        if value is None:
            continue
        if isinstance(value, bool) and action.choices is not None:
            raise ConfigError(
                f"{key!r} in {source}: YAML reads `{_to_text(value)}` as a boolean here; quote the value "
                f'(e.g. {key}: "no") to pass one of {list(action.choices)}'
            )
        if isinstance(value, list) and action.nargs in ("+", "*"):
            args += [f"--{key}", *map(_to_text, value)]
        else:
            args.append(f"--{key}={_to_text(value)}")
    return args


def _default_args(task_name: str, config_path: str | None) -> list[str]:
    """CLI-level defaults, placed before the YAML so that YAML and command line override them."""
    import torch

    defaults: dict[str, Any] = {"report_to": "none", **get_task(task_name).training_defaults}
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
    if config_path is not None:
        defaults["output_dir"] = str(Path("runs") / Path(config_path).stem)
    return [f"--{k}={_to_text(v)}" for k, v in defaults.items()]


def _read_yaml(config_path: str | None) -> dict[str, Any]:
    if config_path is None:
        return {}
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {config_path!r} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:  # one line naming the file and the place, not the parser's traceback
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {config_path!r} is not valid YAML: {problem}{where}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {config_path!r} is not UTF-8 text: {error}") from error


def _selector(name: str, mapping: dict[str, Any], cli_args: Sequence[str], default: str) -> str:
    """`model_type` / `task`, read first (they decide which arguments exist): command line > YAML > default."""
    pre = _RaiseOnError(add_help=False)
    pre.add_argument(f"--{name}")
    value = pre.parse_known_args(list(cli_args))[0].__dict__[name]
    return str(value if value is not None else mapping.get(name) or default)


def _prepare(config_path: str | None, cli_args: Sequence[str]) -> tuple[dict[str, Any], str, str, HfArgumentParser]:
    """The YAML mapping, the selected model_type and task, and the parser they call for."""
    mapping = _read_yaml(config_path)
    checkpoint = _selector("model_name_or_path", mapping, cli_args, "")
    default_model_type = load_checkpoint_config(checkpoint).model_type if checkpoint else DEFAULT_MODEL_TYPE
    task_name = _selector("task", mapping, cli_args, DEFAULT_TASK)
    alias = get_task(task_name).model_type_key  # e.g. linearize's `into` names the model_type
    if alias is not None:
        default_model_type = _selector(alias, mapping, cli_args, default_model_type)
    model_type = _selector("model_type", mapping, cli_args, default_model_type)
    return mapping, model_type, task_name, build_parser(model_type, task_name)


def parse_train_args(config_path: str | None, cli_args: Sequence[str] = ()) -> RunArguments:
    """Parse a YAML config plus command-line overrides into `RunArguments`, validating keys and the config."""
    mapping, model_type, task_name, parser = _prepare(config_path, cli_args)
    args = _default_args(task_name, config_path) + yaml_to_args(mapping, parser, f"config file {config_path!r}")
    try:
        data, task_args, model, finetune, training, remaining = parser.parse_args_into_dataclasses(
            args=args + list(cli_args), return_remaining_strings=True, look_for_args_file=False
        )
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # e.g. TrainingArguments' own consistency checks
        raise ConfigError(str(error)) from error
    if remaining:
        key = next((r for r in remaining if r.startswith("-")), None)
        if key is None:
            raise ConfigError(f"unexpected argument(s) on the command line: {' '.join(remaining)}")
        raise _unknown_key(key.lstrip("-").split("=", 1)[0], parser, "the command line")
    overrides = {k: v for k, v in dataclasses.asdict(model).items() if v is not None and k != "model_type"}
    build_config(model_type, overrides)  # fail now, not after loading data, on a bad config value
    return RunArguments(
        data=data,
        task=task_args,
        model_type=model_type,
        model_overrides=overrides,
        training=training,
        finetune=finetune,
    )


def _train(argv: list[str]) -> int:
    from .training import run

    config_path = argv[0] if argv and not argv[0].startswith("-") else None
    overrides = argv[1:] if config_path is not None else argv
    if "-h" in overrides or "--help" in overrides:
        _prepare(config_path, overrides)[-1].print_help()
        return 0
    if config_path is None:
        raise ConfigError("usage: hf-extras train CONFIG.yaml [--key value | --key=value ...]")
    run(parse_train_args(config_path, overrides))
    return 0


def _bench(argv: list[str]) -> int:
    """`hf-extras bench`: the speed tables and plots of `hf_extras.bench` (see `--help`)."""
    from .bench.cli import main as bench_main

    return bench_main(argv)


COMMANDS = {"train": _train, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-extras` console script; returns the exit status (2 for a configuration error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = (
            "usage: hf-extras train CONFIG.yaml [--key value | --key=value ...]\n"
            "       hf-extras bench [--quick] [--models NAME ...] [--out DIR] (see hf-extras bench --help)"
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hf-extras: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as error:
        print(f"hf-extras: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
