"""HfxMamba vs transformers' MambaForCausalLM (its default CPU path) and Llama (SDPA), one run, one machine.

Measured, for the same config (4 layers, width 256, state 16, expand 2, conv 4, vocab 1024: 2.01M parameters) and a
Llama of equal parameters (width 256, 4 layers, 4 heads, FFN 232, tied embeddings: 2.03M):

* training step time (forward with `labels` + backward, no optimizer) and inference forward time (`use_cache=False`)
  at each `--lengths` (default 512 and 2048), batch `--batch`;
* peak memory (resident set growth over the step, in a fresh process per model) of a training step at
  `--memory-length` (default 8192).

The fast models are timed round-robin (one step of each per round, `--repeats` rounds after a warm-up), so background
load hits them alike; the minimum and the median are reported. transformers' Mamba loops over tokens in Python on
a CPU (no `mamba_ssm` kernels; its `associative_scan` path is used only under `torch.compile`), which takes minutes
per training step, so it is timed once (after the warm-up that the others get too, skipped for it above
`--hf-warmup-max-len`), and its training step is skipped above `--hf-train-max-len` and its 8192 memory run always.

    python benchmarks/mamba_vs_transformers.py                       # the full table (about an hour on 2 cores)
    python benchmarks/mamba_vs_transformers.py --lengths 512 --hf-train-max-len 0   # a quick look

Nothing is asserted; ratios > 1 mean HfxMamba is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from hf_extras.bench import process_memory_mb

VOCAB, HIDDEN, LAYERS, STATE = 1024, 256, 4, 16


def build(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM
    from transformers.utils import logging

    import hf_extras  # noqa: F401
    from hf_extras import HfxMambaConfig, HfxMambaForCausalLM

    logging.set_verbosity_error()  # the "falling back to its reference PyTorch implementation" notices
    torch.manual_seed(0)
    if kind == "hf_mamba":
        model = MambaForCausalLM(
            MambaConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=STATE, use_cache=False
            )
        )
    elif kind == "hfx_mamba":
        model = HfxMambaForCausalLM(
            HfxMambaConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=STATE, use_cache=False
            )
        )
    elif kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                num_key_value_heads=4,
                intermediate_size=232,
                tie_word_embeddings=True,
                use_cache=False,
                attn_implementation="sdpa",
            )
        )
    else:
        raise ValueError(kind)
    return model


def train_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def infer_step(model, ids):
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure_memory(kind: str, length: int, batch: int) -> dict:
    """Run in a fresh process: peak RSS growth of one training step (after the model and inputs exist)."""
    model = build(kind)
    ids = torch.randint(0, VOCAB, (batch, length))
    before = process_memory_mb("current")
    seconds = timed(train_step, model, ids)
    peak = process_memory_mb("peak")  # VmHWM: see process_memory_mb
    return {"kind": kind, "length": length, "peak_step_mib": peak - before, "seconds": seconds}


def fmt_s(value) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048], help="none: memory runs only")
    parser.add_argument("--memory-length", type=int, default=8192, help="0 skips the memory runs")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the fast models")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--hf-train-max-len", type=int, default=2048, help="skip HF Mamba training above this")
    parser.add_argument("--hf-warmup-max-len", type=int, default=512, help="no warm-up step for HF Mamba above this")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, help="also save a bar chart here (PNG)")
    parser.add_argument("--_memory", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args._memory:
        print(json.dumps(measure_memory(args._memory[0], int(args._memory[1]), args.batch)))
        return

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start"
    )
    models = {kind: build(kind) for kind in ("hf_mamba", "hfx_mamba", "llama")} if args.lengths else {}
    for kind, model in models.items():
        print(f"# {kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    results = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "times": {}, "memory": {}}

    for length in args.lengths:
        ids = torch.randint(0, VOCAB, (args.batch, length))
        for phase, step in (("train", train_step), ("infer", infer_step)):
            runs = {"hfx_mamba": [], "llama": []}
            for kind in runs:  # warm-up
                step(models[kind], ids)
            for _ in range(args.repeats):
                for kind in runs:
                    runs[kind].append(timed(step, models[kind], ids))
            hf_time = None
            if phase == "infer" or length <= args.hf_train_max_len:
                if length <= args.hf_warmup_max_len:
                    step(models["hf_mamba"], ids)
                hf_time = timed(step, models["hf_mamba"], ids)
            row = {kind: {"min": min(v), "median": statistics.median(v)} for kind, v in runs.items()}
            row["hf_mamba"] = hf_time
            results["times"][f"{phase}@{length}"] = row
            hfx, llama = row["hfx_mamba"]["min"], row["llama"]["min"]
            print(
                f"{phase:5s} T={length:5d}: HF Mamba {fmt_s(hf_time):>8s} | HfxMamba {fmt_s(hfx):>8s} "
                f"(median {fmt_s(row['hfx_mamba']['median'])}) | Llama {fmt_s(llama):>8s} "
                f"(median {fmt_s(row['llama']['median'])})",
                flush=True,
            )

    if args.memory_length:
        for kind in ("hfx_mamba", "llama"):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--_memory",
                kind,
                str(args.memory_length),
                "--batch",
                str(args.batch),
            ] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results["memory"][kind] = json.loads(out)
            print(
                f"memory T={args.memory_length}: {kind} peak step growth {results['memory'][kind]['peak_step_mib']:.0f} MiB "
                f"(step {fmt_s(results['memory'][kind]['seconds'])})",
                flush=True,
            )
        results["memory"]["hf_mamba"] = None

    # the table
    print()
    print("| phase | T | HF Mamba | HfxMamba | HF / Hfx | Llama (SDPA) | Llama / Hfx |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, row in results["times"].items():
        phase, length = key.split("@")
        hfx, llama, hf = row["hfx_mamba"]["min"], row["llama"]["min"], row["hf_mamba"]
        speedup = f"{hf / hfx:.1f}x" if hf else "not run"
        tok = args.batch * int(length)
        print(
            f"| {phase} | {length} | {fmt_s(hf)} | {fmt_s(hfx)} ({tok / hfx:,.0f} tok/s) | {speedup} | "
            f"{fmt_s(llama)} ({tok / llama:,.0f} tok/s) | {llama / hfx:.2f}x |"
        )
    if results["memory"]:
        mem = results["memory"]
        print(
            f"| train peak memory | {args.memory_length} | not run (token loop: hours) | "
            f"{mem['hfx_mamba']['peak_step_mib']:.0f} MiB | | {mem['llama']['peak_step_mib']:.0f} MiB | |"
        )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(results["times"])
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.27
        for i, kind in enumerate(("hf_mamba", "hfx_mamba", "llama")):
            values = [
                (results["times"][k][kind] if kind == "hf_mamba" else results["times"][k][kind]["min"]) or 0
                for k in keys
            ]
            ax.bar([j + (i - 1) * width for j in range(len(keys))], values, width, label=kind)
        ax.set_xticks(range(len(keys)), keys)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title(f"CPU step time, batch {args.batch}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
