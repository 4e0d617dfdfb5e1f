"""Pretrain a small Llama teacher offline, for linearizing (`configs/linearize.yaml`, `benchmarks/linearize_demo.py`).

transformers' own `LlamaForCausalLM` (SDPA), trained by `hf-extras train` with `model_type: llama` on the embedded
corpus (the Python standard library's source, byte tokenizer), with the data settings of `configs/linearize.yaml`
(`block_size`, `packing: concat`, `max_eval_samples`) so a linearize run evaluates on the teacher's own validation
blocks. Default: 4 blocks x 256 wide, 4 heads (2 k/v heads: grouped-query attention, as Llama 3 and Qwen have), SwiGLU
FFN 704, tied embeddings; 3,000 steps of 16 x 256 tokens (12.3M tokens, about 4 per parameter).

    python benchmarks/pretrain_teacher.py --output_dir runs/teacher
    hf-extras train configs/linearize.yaml --teacher_model_name_or_path runs/teacher

The run folder (`save_pretrained`: config, safetensors, tokenizer, metrics.json) loads with
`AutoModelForCausalLM.from_pretrained`; `metrics.json` holds its validation loss and `tokens_seen`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LINEARIZE_YAML = ROOT / "configs" / "linearize.yaml"
DATA_KEYS = ("block_size", "max_eval_samples", "per_device_eval_batch_size", "seed")

TEACHER = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 704,
    "tie_word_embeddings": True,
}
TRAINING = {
    "task": "causal_lm",
    "packing": "concat",
    "per_device_train_batch_size": 16,
    "learning_rate": 2.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "logging_steps": 50,
    "logging_first_step": True,
    "eval_strategy": "no",
    "save_strategy": "no",
    "sample_max_new_tokens": 0,
    "disable_tqdm": True,
}


def linearize_data_keys() -> dict:
    """`configs/linearize.yaml`'s data keys, so every run of the demo evaluates on the same validation blocks."""
    recipe = yaml.safe_load(LINEARIZE_YAML.read_text())
    return {k: recipe[k] for k in DATA_KEYS}


def teacher_recipe(output_dir: Path, steps: int) -> dict:
    """The teacher run's `hf-extras train` YAML: the linearize recipe's data keys, the Llama and its training."""
    return {
        **linearize_data_keys(),
        **TRAINING,
        **TEACHER,
        "max_steps": steps,
        "output_dir": str(output_dir),
    }


def pretrain_teacher(output_dir: Path, steps: int, extra: list[str] = ()) -> None:
    """Run `hf-extras train` on the teacher recipe in a fresh process; `extra`: more `--key value` arguments."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "teacher.yaml"
        recipe.write_text(yaml.safe_dump(teacher_recipe(output_dir, steps)))
        subprocess.run([sys.executable, "-m", "hf_extras.cli", "train", str(recipe), *extra], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/teacher"))
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of 16 x block_size tokens")
    args, extra = parser.parse_known_args(argv)  # anything else goes to `hf-extras train` (e.g. --hidden_size 128)
    pretrain_teacher(args.output_dir, args.steps, extra)


if __name__ == "__main__":
    main()
