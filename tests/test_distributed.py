"""DDP on CPU (gloo): two processes with the same global batch train exactly like one process.

Plain SGD (not Adam) makes the comparison sharp: a loss scaled by the world size, or gradients never averaged
across processes, change SGD's step, while Adam's normalisation would hide a constant factor. The losses logged at
each step must agree to float reduction order (1e-4 relative here).

The fast test launches this file under torchrun (the worker is `__main__` below) and drives `Trainer` directly on an
in-memory dataset; the slow ones run `hf-extras train` unchanged under `torchrun` and `accelerate launch`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, STEPS, SEQ = 4, 5, 32
RTOL = 1e-4


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def _launch(launcher: str, script: list[str], timeout: int) -> subprocess.CompletedProcess:
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # `accelerate launch --cpu` would run one process: --multi_gpu with use_cpu=True gives gloo DDP
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
        ]
    result = subprocess.run(command + script, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _step_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------------------------
# fast: Trainer on an in-memory dataset
# ---------------------------------------------------------------------------------------------------------------


def train_tiny(output_dir: str, per_device_batch: int) -> list[float]:
    """Train a tiny RetNet causal LM for `STEPS` SGD steps (same data and init on every rank); the step losses."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    import hf_extras
    from hf_extras.training import default_find_unused_parameters, evaluate_before_training

    set_seed(0)
    config = hf_extras.RetNetConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8)
    model = hf_extras.RetNetForCausalLM(config)
    gen = torch.Generator().manual_seed(1)  # arithmetic progressions mod 96: learnable in a few steps
    start, stride = torch.randint(0, 96, (64, 1), generator=gen), torch.randint(1, 4, (64, 1), generator=gen)
    ids = (start + stride * torch.arange(SEQ)) % 96
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=8,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    default_find_unused_parameters(args, config)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        data_collator=default_data_collator,
    )
    evaluate_before_training(trainer)  # as `hf-extras train` does: the untrained model first
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    if trainer.is_world_process_zero():
        Path(output_dir, "losses.json").write_text(
            json.dumps(
                {"losses": _step_losses(trainer.state.log_history), "wrapped": wrapped, "world": args.world_size}
            )
        )
    return _step_losses(trainer.state.log_history)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single = train_tiny(str(tmp_path / "one"), GLOBAL_BATCH)
    _launch("torchrun", [str(Path(__file__)), str(tmp_path / "two"), str(GLOBAL_BATCH // 2)], timeout=240)
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert two["world"] == 2 and two["wrapped"] == "DistributedDataParallel"
    assert len(single) == len(two["losses"]) == STEPS
    assert single[-1] < single[0] - 0.05  # it trained: equal losses are not the untrained ones
    assert two["losses"] == pytest.approx(single, rel=RTOL)


def test_find_unused_parameters_default():
    from transformers import TrainingArguments

    import hf_extras
    from hf_extras.training import default_find_unused_parameters

    moe = hf_extras.RetNetConfig(hidden_size=32, num_heads=2, ffn_type="moe", num_experts=4, num_experts_per_tok=1)
    dense = hf_extras.RetNetConfig(hidden_size=32, num_heads=2)
    for config, expected in ((moe, True), (dense, False)):
        args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
        default_find_unused_parameters(args, config)
        assert args.ddp_find_unused_parameters is expected
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", ddp_find_unused_parameters=True)
    default_find_unused_parameters(args, dense)
    assert args.ddp_find_unused_parameters is True  # an explicit choice is kept


# ---------------------------------------------------------------------------------------------------------------
# slow: `hf-extras train` unchanged under torchrun and accelerate launch
# ---------------------------------------------------------------------------------------------------------------


def _cli_args(data_file: Path, output_dir: Path, per_device_batch: int, *extra: str) -> list[str]:
    return [
        "train",
        str(REPO / "configs" / "quickstart.yaml"),
        "--dataset_name",
        str(data_file),
        "--output_dir",
        str(output_dir),
        "--block_size",
        str(SEQ),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "8",
        "--sample_max_new_tokens",
        "0",
        "--hidden_size",
        "32",
        "--num_hidden_layers",
        "2",
        "--num_heads",
        "2",
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--per_device_eval_batch_size",
        "8",
        "--optim",
        "sgd",
        "--learning_rate",
        "0.5",
        "--lr_scheduler_type",
        "constant",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    import inspect

    path = tmp_path_factory.mktemp("ddp_data") / "data.jsonl"
    source = inspect.getsource(json) + inspect.getsource(subprocess)
    path.write_text("".join(json.dumps({"text": source[i : i + 2000]}) + "\n" for i in range(0, len(source), 2000)))
    return path


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    hf_extras_cli = shutil.which("hf-extras") or "hf-extras"
    subprocess.run(
        [hf_extras_cli, *_cli_args(text_file, out, GLOBAL_BATCH)],
        cwd=REPO,
        env=_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
@pytest.mark.parametrize("ffn_type", ["glu", "moe"])
def test_hf_extras_train_under_launchers(tmp_path, text_file, single_run, launcher, ffn_type):
    """`hf-extras train` under a launcher: same step losses as one process, one run folder written by rank 0.

    MoE (4 experts, top-1, no aux loss: the load-balancing loss is a product of batch means, not a sum over
    micro-batches) runs with DDP's unused-parameter search that `default_find_unused_parameters` turns on; its
    losses are compared with a one-process MoE run of its own.
    """
    extra = (
        ["--ffn_type", "moe", "--num_experts", "4", "--num_experts_per_tok", "1", "--router_aux_loss_coef", "0.0"]
        if ffn_type == "moe"
        else []
    )
    reference = single_run
    if extra:
        reference = tmp_path / "single_moe"
        subprocess.run(
            [shutil.which("hf-extras") or "hf-extras", *_cli_args(text_file, reference, GLOBAL_BATCH, *extra)],
            cwd=REPO,
            env=_env(),
            check=True,
            capture_output=True,
            timeout=300,
        )
    out = tmp_path / "two"
    result = _launch(
        launcher, ["-m", "hf_extras.cli", *_cli_args(text_file, out, GLOBAL_BATCH // 2, *extra)], timeout=400
    )
    one = json.loads((reference / "trainer_state.json").read_text())["log_history"]
    two = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert _step_losses(two) == pytest.approx(_step_losses(one), rel=RTOL)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS
    assert result.stdout.count("run folder:") == 2  # both ranks finish; only rank 0 writes (checked below)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("metrics")) == ["metrics.json"]


if __name__ == "__main__":  # the torchrun worker of the fast test
    train_tiny(sys.argv[1], int(sys.argv[2]))
