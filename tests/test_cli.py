"""`hf-extras train`: YAML + command-line parsing, key and value validation, and tiny end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_extras.cli import main, parse_train_args
from hf_extras.errors import ConfigError
from hf_extras.training import build_config

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

# quickstart.yaml shrunk to a few seconds on a CPU
TINY = [
    "--max_steps", "3", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_heads", "2",
    "--block_size", "32", "--max_train_samples", "96", "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--logging_steps", "1", "--eval_steps", "2", "--warmup_steps", "1", "--sample_max_new_tokens", "8",
    "--disable_tqdm", "true",
]  # fmt: skip


def write_yaml(tmp_path: Path, **mapping) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def test_end_to_end_run_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(QUICKSTART), *TINY, f"--output_dir={out}"]) == 0

    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss_curve.png", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "modeling_retnet.py").is_file()  # remote code travels with the weights

    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "initial_eval_loss", "initial_eval_perplexity", "final_eval_loss", "final_eval_perplexity",
        "train_loss", "steps", "tokens_seen", "train_runtime_s", "total_runtime_s", "num_parameters", "sample",
    ):  # fmt: skip
        assert key in metrics, key
    assert metrics["steps"] == 3
    assert metrics["tokens_seen"] == 3 * 4 * 32
    assert metrics["final_eval_perplexity"] == pytest.approx(
        torch.tensor(metrics["final_eval_loss"]).exp().item(), rel=1e-4
    )
    assert metrics["sample"]["prompt"] == yaml.safe_load(QUICKSTART.read_text())["sample_prompt"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card = (out / "README.md").read_text()
    for text in ("RetNet", "hfx_retnet", "AutoModelForCausalLM", "trust_remote_code", "perplexity"):
        assert text in card, text

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "RetNetForCausalLM"
    assert (model.config.hidden_size, model.num_parameters()) == (32, metrics["num_parameters"])
    assert model.config.vocab_size >= len(tokenizer)
    ids = tokenizer("def f(x):", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_any_text_dataset_replaces_the_default_corpus(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": f"line {i}: " + "spam and eggs " * 20}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    argv = ["train", str(QUICKSTART), *TINY, f"--output_dir={out}", f"--dataset_name={data}", "--text_column=body"]
    assert main(argv + ["--validation_fraction=0.1", "--max_steps=2", "--eval_strategy=no"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["final_eval_loss"] < metrics["initial_eval_loss"]
    assert "docs.jsonl" in (out / "README.md").read_text()


def test_command_line_beats_yaml_and_last_value_wins(tmp_path):
    config = write_yaml(tmp_path, hidden_size=64, learning_rate=1.0e-3, block_size=64, output_dir=str(tmp_path))
    args = parse_train_args(config, ["--hidden_size", "96", "--learning_rate=3e-4", "--hidden_size=128"])
    assert args.model_overrides["hidden_size"] == 128
    assert args.training.learning_rate == 3e-4
    assert args.task.block_size == 64  # untouched YAML value
    assert args.model_type == "hfx_retnet" and args.data.task == "causal_lm"
    assert "num_heads" not in args.model_overrides  # unset fields keep the config's defaults


def test_yaml_int_for_float_field_and_cli_defaults(tmp_path):
    config = write_yaml(tmp_path, hidden_dropout=0, rope_theta=500, weight_decay=0, output_dir=str(tmp_path))
    args = parse_train_args(config)
    assert args.model_overrides["hidden_dropout"] == 0.0 and isinstance(args.model_overrides["hidden_dropout"], float)
    assert isinstance(args.model_overrides["rope_theta"], float)
    assert args.training.weight_decay == 0.0
    assert args.training.report_to in ("none", [], ["none"])  # CLI default: no experiment tracker


@pytest.mark.parametrize("where", ["yaml", "cli"])
@pytest.mark.parametrize(
    "key, suggestion", [("hiden_size", "hidden_size"), ("lerning_rate", "learning_rate"), ("blocksize", "block_size")]
)
def test_unknown_key_is_named_with_a_suggestion(tmp_path, where, key, suggestion):
    if where == "yaml":
        config, cli = write_yaml(tmp_path, **{key: 1, "output_dir": str(tmp_path)}), []
    else:
        config, cli = write_yaml(tmp_path, output_dir=str(tmp_path)), [f"--{key}", "1"]
    with pytest.raises(ConfigError, match=rf"unknown key '{key}' in .*did you mean '{suggestion}'"):
        parse_train_args(config, cli)


def test_abbreviated_and_stray_arguments_are_rejected(tmp_path):
    config = write_yaml(tmp_path, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="'hidden'"):
        parse_train_args(config, ["--hidden", "64"])  # argparse would otherwise expand it to --hidden_size
    with pytest.raises(ConfigError, match="unexpected"):
        parse_train_args(config, ["64"])


@pytest.mark.parametrize(
    "values, field",
    [
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),  # the config's own cross-field validator
        ({"forward_mode": "paralel"}, "forward_mode"),  # Literal choices
        ({"hidden_size": 64.5}, "hidden_size"),  # wrong type
        ({"norm_eps": -1.0}, "norm_eps"),
    ],
)
def test_bad_config_value_names_the_field(tmp_path, values, field):
    config = write_yaml(tmp_path, output_dir=str(tmp_path), **values)
    with pytest.raises(ConfigError, match=field):
        parse_train_args(config)


def test_yaml_boolean_for_a_choice_field_asks_for_quotes(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path}\nsave_strategy: no\n")  # YAML 1.1 reads `no` as false
    with pytest.raises(ConfigError, match="save_strategy.*quote"):
        parse_train_args(str(config))


def test_unknown_model_type_and_task(tmp_path):
    config = write_yaml(tmp_path, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="did you mean 'hfx_retnet'"):
        parse_train_args(config, ["--model_type", "hfx_retnett"])
    with pytest.raises(ConfigError, match="did you mean 'causal_lm'"):
        parse_train_args(config, ["--task=causal_l"])


def test_main_prints_errors_and_help(tmp_path, capsys):
    config = write_yaml(tmp_path, output_dir=str(tmp_path))
    assert main(["train", config, "--bogus", "1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert main(["train", config, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--forward_mode" in out and "--learning_rate" in out and "--block_size" in out


def test_quickstart_config_parses():
    args = parse_train_args(str(QUICKSTART))
    assert args.model_type == "hfx_retnet" and args.data.task == "causal_lm"
    assert args.training.max_steps > 0 and not args.training.bf16
    assert args.data.max_eval_samples is not None


@pytest.mark.parametrize("config", sorted(QUICKSTART.parent.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_parses(config, tmp_path):
    """A shipped config whose keys or values drifted from the argument classes fails here, not at a user's desk."""
    cli_args, mapping = [], yaml.safe_load(config.read_text())
    if "model_name_or_path" in mapping:  # its base is a run folder made by another config
        base = tmp_path / "base"
        tiny = build_config("hfx_retnet", {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2})
        AutoModelForCausalLM.from_config(tiny).save_pretrained(base)
        cli_args = ["--model_name_or_path", str(base)]
    args = parse_train_args(str(config), cli_args)
    assert args.data.task == mapping["task"]
    assert Path(args.training.output_dir) == Path(mapping["output_dir"])
    assert args.training.learning_rate == mapping["learning_rate"]
    if config.name == "multiemo_finetune.yaml":  # the measured LoRA recipe (README table)
        assert args.finetune.finetune_method == "lora"
        assert args.finetune.peft_target_modules == ["q_proj", "v_proj", "o_proj", "down_proj"]
        assert args.training.learning_rate == 2e-3


# --- defects a new user hit: each is one `hf-extras: error:` line, found before anything is loaded ---------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-extras: error: "), err
    return err[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the run gets as far as loading the tokenizer (the first thing it loads)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run loaded its tokenizer before the check")

    monkeypatch.setattr("hf_extras.training.load_tokenizer", refuse)


def test_unwritable_output_dir_fails_before_loading(tmp_path, capsys, nothing_loads):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["train", str(QUICKSTART), *TINY, f"--output_dir={blocker / 'run'}"]) == 2
    line = _error_line(capsys)
    assert "output_dir" in line and "not writable" in line and str(blocker) in line


def test_missing_resume_checkpoint_fails_before_loading(tmp_path, capsys, nothing_loads):
    missing = tmp_path / "no_such_checkpoint"
    argv = ["train", str(QUICKSTART), *TINY, f"--output_dir={tmp_path / 'run'}"]
    assert main([*argv, "--resume_from_checkpoint", str(missing)]) == 2
    assert str(missing) in _error_line(capsys)
    assert main([*argv, "--resume_from_checkpoint", "true"]) == 2  # nothing to resume from in output_dir
    assert "no complete checkpoint" in _error_line(capsys)


def test_last_complete_checkpoint_skips_a_half_written_one(tmp_path):
    from hf_extras.training import last_complete_checkpoint, resolve_resume_checkpoint

    for step, files in ((2, ("trainer_state.json", "model.safetensors")), (10, ("model.safetensors",)), (7, ())):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    (tmp_path / "checkpoint-9.tmp").mkdir()  # not a checkpoint name
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert resolve_resume_checkpoint("true", tmp_path) == str(tmp_path / "checkpoint-2")
    assert resolve_resume_checkpoint(None, tmp_path) is None and resolve_resume_checkpoint("false", tmp_path) is None
    with pytest.raises(ConfigError, match="not a complete"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-10"), tmp_path)


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    """A run killed while saving checkpoint 3 resumes from checkpoint 2: it takes 2 more optimizer steps, not 4."""
    out = tmp_path / "run"
    argv = ["train", str(QUICKSTART), *TINY, f"--output_dir={out}", "--save_strategy=steps", "--save_steps=1"]
    assert main([*argv, "--max_steps=3", "--eval_strategy=no", "--sample_max_new_tokens=0"]) == 0
    (out / "checkpoint-3" / "trainer_state.json").unlink()  # what a kill during the save leaves

    steps = []
    handle = register_optimizer_step_post_hook(lambda *args: steps.append(1))
    try:
        resumed = ["--max_steps=4", "--eval_strategy=no", "--sample_max_new_tokens=0", "--resume_from_checkpoint=true"]
        assert main([*argv, *resumed]) == 0
    finally:
        handle.remove()
    assert len(steps) == 2  # steps 3 and 4; a fresh start would take 4
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_empty_dataset_file_is_one_error_line(tmp_path, capsys):
    for name in ("empty.jsonl", "empty.txt"):
        data = tmp_path / name
        data.write_text("")
        argv = ["train", str(QUICKSTART), *TINY, f"--output_dir={tmp_path / 'run'}", f"--dataset_name={data}"]
        assert main(argv) == 2
        line = _error_line(capsys)
        assert str(data) in line and "empty" in line


def test_malformed_yaml_is_one_error_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("task: causal_lm\nmax_steps: [3\nhidden_size: 32\n")
    assert main(["train", str(config)]) == 2
    line = _error_line(capsys)
    assert str(config) in line and "not valid YAML" in line and "line" in line
