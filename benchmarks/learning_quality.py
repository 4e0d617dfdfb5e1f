"""Learning quality at one budget: each family's causal LM trained on the quickstart recipe (stdlib corpus, byte
tokenizer, width 128, 4 layers, block 128, batch 16, lr 2e-3) for the same number of steps, and transformers' Llama
(SDPA) of the same width and depth as the softmax baseline; prints and saves validation loss and perplexity.

Each model runs `hf-extras train configs/quickstart.yaml` with its `--model_type` in a fresh process (the CLI is the
measured path), one after the other, so the table compares what a user of the recipe gets. Llama's FFN (512) puts it at
the RetNet quickstart's parameter count; the others are not matched (the count is reported): Mamba-style models have
no FFN.

    python benchmarks/learning_quality.py --steps 400 --out benchmarks/results/cpu/learning_quality.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MODEL_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_heads")

# name -> command-line model arguments (width 128 and 4 layers for all, as the quickstart)
MODELS: dict[str, list[str]] = {
    "llama": ["--model_type", "llama", "--num_attention_heads", "4", "--num_key_value_heads", "4"]
    + ["--intermediate_size", "512", "--tie_word_embeddings", "true"],
    "retnet": ["--model_type", "hfx_retnet", "--num_heads", "4"],
    "gla": ["--model_type", "hfx_gated_retention", "--gate", "key", "--num_heads", "4"],
    "gated_deltanet": ["--model_type", "hfx_gated_deltanet", "--num_heads", "4"],
    "mamba": ["--model_type", "hfx_mamba"],
    "mamba2": ["--model_type", "hfx_mamba2", "--num_heads", "4"],
}


def run_one(name: str, steps: int, workdir: Path, base_yaml: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, "-m", "hf_extras.cli", "train", str(base_yaml), *MODELS[name]]
    cmd += ["--hidden_size", "128", "--num_hidden_layers", "4", "--max_steps", str(steps)]
    cmd += [
        "--eval_steps",
        str(steps),
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        "--sample_max_new_tokens",
        "0",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    keep = ("num_parameters", "final_eval_loss", "final_eval_perplexity", "tokens_seen", "train_runtime_s")
    return {"model": name, **{k: metrics[k] for k in keep}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per model (16 x 128 tokens each)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    recipe = {k: v for k, v in yaml.safe_load(QUICKSTART.read_text()).items() if k not in MODEL_KEYS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_yaml = Path(tmp) / "recipe.yaml"
        base_yaml.write_text(yaml.safe_dump(recipe))
        for name in args.models:
            rows.append(run_one(name, args.steps, Path(tmp), base_yaml))
            row = rows[-1]
            print(
                f"{name:15s} params {row['num_parameters']:>9,d}  val loss {row['final_eval_loss']:.4f}  "
                f"ppl {row['final_eval_perplexity']:.3f}  train {row['train_runtime_s']:.0f} s",
                flush=True,
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
