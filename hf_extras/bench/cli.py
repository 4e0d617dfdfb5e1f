"""`hf-extras bench` and `python benchmarks/run_cpu.py`: run the suite from command-line options, print the tables
and write `results.json`, `table.md` and the plots into `--out`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from .models import DEFAULT_FAMILIES, MODELS
from .report import format_tables, write_report
from .suite import environment_info, run_suite
from .timing import available_cores

__all__ = ["QUICK", "main", "parse_bench_args"]


QUICK = dict(
    seq_lens=(64, 128),
    contexts=(32, 128),
    hidden=64,
    layers=2,
    heads=2,
    tokens_per_step=256,
    train_steps=2,
    train_warmup=1,
    new_tokens=8,
    decode_warmup=2,
)


def parse_bench_args(argv: Sequence[str] | None = None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="hf-extras bench",
        description="Training tokens/s, peak memory and decode latency of hf_extras families against transformers' "
        "Llama (SDPA) and Mamba, one run, one machine; markdown tables on stdout, results.json, table.md and PNG "
        "plots in --out.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (hidden 64, 2 layers, short sequences)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"), help="output folder")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_FAMILIES),
        choices=sorted(MODELS),
        help="models to run (ratios are against llama)",
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", help="training sequence lengths (default 512 2048 8192)")
    parser.add_argument("--contexts", type=int, nargs="+", help="decode context lengths (default 256 8192)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, help="number of layers (default 4)")
    parser.add_argument("--heads", type=int, help="number of heads (default 4)")
    parser.add_argument("--tokens-per-step", type=int, help="training tokens per step (default 8192)")
    parser.add_argument("--steps", type=int, help="timed training steps per configuration (default 3)")
    parser.add_argument("--new-tokens", type=int, help="timed decode steps per context (default 128)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all available cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite from command-line arguments; returns 1 if a configuration failed (skips are not failures)."""
    args = parse_bench_args(argv)
    suite: dict[str, Any] = dict(QUICK) if args.quick else {}
    for key, value in (
        ("seq_lens", args.seq_lens),
        ("contexts", args.contexts),
        ("hidden", args.hidden),
        ("layers", args.layers),
        ("heads", args.heads),
        ("tokens_per_step", args.tokens_per_step),
        ("train_steps", args.steps),
        ("new_tokens", args.new_tokens),
    ):
        if value is not None:
            suite[key] = tuple(value) if isinstance(value, list) else value
    threads = args.threads or available_cores()
    meta = environment_info(threads)
    meta["suite"] = {"models": args.models, "quick": args.quick, **suite}
    print(
        f"hf_extras benchmark: {threads} threads, torch {meta['torch']}, transformers {meta['transformers']}"
        + (f", load average {meta['load_average'][0]:.2f}" if "load_average" in meta else ""),
        flush=True,
    )
    if meta.get("load_average") and meta["load_average"][0] > 0.5 * meta["available_cores"]:
        print(
            f"WARNING: the machine is busy (load average {meta['load_average'][0]:.2f} on {meta['available_cores']} "
            "cores): absolute timings will be noisy (the round-robin keeps ratios fairer).",
            flush=True,
        )
    start = time.perf_counter()
    rows = run_suite(
        families=args.models,
        threads=threads,
        isolate=not args.no_memory,
        progress=lambda message: print(message, flush=True),
        **suite,
    )
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    paths = write_report(rows, args.out, meta)
    print()
    print(format_tables(rows))
    print("wrote " + ", ".join(paths.values()))
    return 1 if any(row.get("error") and not row["error"].startswith("skipped") for row in rows) else 0
