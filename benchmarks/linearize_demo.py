"""Offline linearizing demonstration: a pretrained Llama teacher -> our linear families, against training from scratch.

1. The teacher: `benchmarks/pretrain_teacher.py` (transformers' Llama, 4 x 256, trained on the embedded stdlib corpus),
   run first unless `--teacher` names an existing folder.
2. For each target (`--into`): `hf-extras train configs/linearize.yaml --teacher_model_name_or_path TEACHER --into X`
   with `--stage1_steps` attention-transfer steps and `--stage2_steps` next-token (+ KL) steps; by default stage 2
   takes the steps that bring both stages to `--token_fraction` (10%) of the teacher's training tokens.
3. The same architecture (the linearized run's config) trained from scratch by `hf-extras train` (task `causal_lm`,
   the teacher's learning rate) for as many tokens as stages 1 and 2 together.

Every run evaluates on the same validation blocks (`configs/linearize.yaml`'s `block_size` and `max_eval_samples`,
`packing: concat`). Prints a table and writes the rows as JSON (`--out`): teacher, the copy before training, after
stage 1, after stage 2, scratch, and the tokens each used.

    python benchmarks/linearize_demo.py --teacher runs/teacher --out benchmarks/results/cpu/linearize_demo.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_teacher import TRAINING, linearize_data_keys, pretrain_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LINEARIZE_YAML = ROOT / "configs" / "linearize.yaml"
# the demo's settings over configs/linearize.yaml (tuned on this teacher, README): stage 2's learning rate, decays for
# 256-token blocks (memory 4..256 tokens rather than the recipe's long-context 32..2048), a stronger KL term
LINEARIZE_DEFAULTS = ("learning_rate=1e-3", "decay_horizons=4 256", "kl_weight=4")
NOT_CLI_KEYS = ("architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "model_type")


def step_tokens(args: argparse.Namespace) -> int:
    """Tokens per optimizer step of either stage: `--batch_size` rows of the recipe's `block_size`."""
    return args.batch_size * linearize_data_keys()["block_size"]


def _train(recipe: Path, arguments: dict, workdir: Path) -> dict:
    """`hf-extras train RECIPE --key value ...` in a fresh process; returns its metrics.json."""
    command = [sys.executable, "-m", "hf_extras.cli", "train", str(recipe)]
    for key, value in arguments.items():  # a value with spaces is a list: `decay_horizons=8 512`
        command += [f"--{key}", *(str(value).lower() if isinstance(value, bool) else str(value)).split()]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=workdir)
    return json.loads((Path(arguments["output_dir"]) / "metrics.json").read_text())


def linearize_run(teacher: Path, into: str, out: Path, args: argparse.Namespace) -> dict:
    """One linearize run; returns its losses and the tokens of both stages."""
    arguments = {
        "teacher_model_name_or_path": teacher,
        "into": into,
        "output_dir": out,
        "stage1_steps": args.stage1_steps,
        "stage2_steps": args.stage2_steps,
        "per_device_train_batch_size": args.batch_size,
        "eval_steps": args.stage2_steps,
        "sample_max_new_tokens": 0,
        "disable_tqdm": True,
        **dict(a.split("=", 1) for a in args.linearize_arg),
    }
    metrics = _train(LINEARIZE_YAML, arguments, out.parent)
    stage1_tokens = args.stage1_steps * step_tokens(args)
    return {
        "teacher_eval_loss": metrics["teacher_eval_loss"],
        "copy_eval_loss": metrics["linearized_eval_loss"],
        "stage1_eval_loss": metrics["initial_eval_loss"],
        "stage2_eval_loss": metrics["final_eval_loss"],
        "stage1_layer_mse": [metrics.get("stage1_initial_layer_mse"), metrics.get("stage1_final_layer_mse")],
        "tokens": stage1_tokens + metrics["tokens_seen"],
        "num_parameters": metrics["num_parameters"],
        "runtime_s": metrics["total_runtime_s"],
    }


def scratch_run(config_json: Path, out: Path, steps: int, args: argparse.Namespace, workdir: Path) -> dict:
    """The linearized model's architecture from random weights, on the causal-LM task with the teacher's recipe."""
    config = json.loads(config_json.read_text())
    from hf_extras.cli import model_arguments_class

    model_type = config["model_type"]
    fields = {f for f in model_arguments_class(model_type).__dataclass_fields__} - {"model_type"}
    model = {k: v for k, v in config.items() if k in fields and k not in NOT_CLI_KEYS and v is not None}
    values = {
        **TRAINING,
        **linearize_data_keys(),
        "model_type": model_type,
        **model,
        "per_device_train_batch_size": args.batch_size,
        "max_steps": steps,
        "warmup_steps": max(1, steps // 10),
        "output_dir": str(out),
    }
    path = workdir / f"scratch_{model_type}.yaml"
    path.write_text(yaml.safe_dump(values))
    metrics = _train(path, {"output_dir": out}, workdir)
    return {"scratch_eval_loss": metrics["final_eval_loss"], "scratch_tokens": metrics["tokens_seen"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/teacher"), help="teacher folder (made if absent)")
    parser.add_argument("--teacher_steps", type=int, default=3000, help="the teacher's steps, when it is made here")
    parser.add_argument("--into", nargs="+", default=["hfx_gated_retention", "hfx_gated_deltanet"])
    parser.add_argument("--stage1_steps", type=int, default=25)
    parser.add_argument(
        "--stage2_steps",
        type=int,
        default=None,
        help="default: the steps that bring stages 1 + 2 to --token_fraction of the teacher's training tokens",
    )
    parser.add_argument("--token_fraction", type=float, default=0.1, help="the students' token budget (see above)")
    parser.add_argument("--batch_size", type=int, default=4, help="rows of block_size tokens per step, both stages")
    parser.add_argument(
        "--linearize_arg",
        action="append",
        default=list(LINEARIZE_DEFAULTS),
        help=f"KEY=VALUE for every linearize run, after {' '.join(LINEARIZE_DEFAULTS)}",
    )
    parser.add_argument("--no_scratch", action="store_true", help="skip the from-scratch runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    teacher = args.teacher.resolve()
    if not (teacher / "config.json").is_file():
        pretrain_teacher(teacher, args.teacher_steps)
    teacher_metrics = json.loads((teacher / "metrics.json").read_text())
    if args.stage2_steps is None:
        args.stage2_steps = round(args.token_fraction * teacher_metrics["tokens_seen"] / step_tokens(args))
        args.stage2_steps -= args.stage1_steps
        if args.stage2_steps < 1:
            parser.error(f"--token_fraction {args.token_fraction} leaves no stage-2 step after --stage1_steps")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for into in args.into:
            row = {"into": into, **linearize_run(teacher, into, workdir / f"linearize_{into}", args)}
            steps = args.stage1_steps + args.stage2_steps
            if not args.no_scratch:
                row.update(scratch_run(workdir / f"linearize_{into}" / "config.json", workdir / f"scratch_{into}",
                                       steps, args, workdir))  # fmt: skip
            row["teacher_tokens"] = teacher_metrics["tokens_seen"]
            rows.append(row)
            print(
                f"{into}: teacher {row['teacher_eval_loss']:.4f} | copy {row['copy_eval_loss']:.4f} | "
                f"stage 1 {row['stage1_eval_loss']:.4f} | stage 2 {row['stage2_eval_loss']:.4f} "
                f"({row['stage2_eval_loss'] / row['teacher_eval_loss'] - 1:+.1%}) | scratch "
                f"{row.get('scratch_eval_loss', float('nan')):.4f} | tokens {row['tokens']:,} = "
                f"{row['tokens'] / row['teacher_tokens']:.1%} of the teacher's",
                flush=True,
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"settings": {k: str(v) for k, v in vars(args).items()}, "teacher": teacher_metrics, "rows": rows},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
