#!/usr/bin/env python
"""CPU speed benchmark: hf_extras families vs transformers' Llama (SDPA), same width and depth, one run, one machine.

    python benchmarks/run_cpu.py            # the full suite (about 10 minutes on 2 cores; run it on a quiet machine)
    python benchmarks/run_cpu.py --quick    # a tiny smoke run (seconds)

Prints markdown tables (with ratios against Llama) and writes results.json, table.md, train_throughput.png and
decode_latency.png into --out (default benchmarks/results/cpu). The measurements are in `hf_extras.benchmark`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from hf_extras import benchmark

QUICK = dict(
    seq_lens=(64, 128), contexts=(32, 128), hidden=64, layers=2, heads=2, tokens_per_step=256,
    train_steps=2, train_warmup=1, new_tokens=8, decode_warmup=2,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (hidden 64, 2 layers, short sequences)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"), help="output folder")
    parser.add_argument("--models", nargs="+", default=list(benchmark.DEFAULT_FAMILIES),
                        choices=sorted(benchmark.MODELS), help="models to run (the first table baseline is llama)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="training sequence lengths (default 512 2048 8192)")
    parser.add_argument("--contexts", type=int, nargs="+", help="decode context lengths (default 256 8192)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, help="number of layers (default 4)")
    parser.add_argument("--heads", type=int, help="number of heads (default 4)")
    parser.add_argument("--tokens-per-step", type=int, help="training tokens per step (default 8192)")
    parser.add_argument("--steps", type=int, help="timed training steps per configuration (default 3)")
    parser.add_argument("--new-tokens", type=int, help="timed decode steps per context (default 32)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all available cores)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="train in this process (no fresh child per configuration; no memory numbers)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    suite = dict(QUICK) if args.quick else {}
    for key, value in (("seq_lens", args.seq_lens), ("contexts", args.contexts), ("hidden", args.hidden),
                       ("layers", args.layers), ("heads", args.heads), ("tokens_per_step", args.tokens_per_step),
                       ("train_steps", args.steps), ("new_tokens", args.new_tokens)):
        if value is not None:
            suite[key] = tuple(value) if isinstance(value, list) else value
    threads = args.threads or benchmark.available_cores()
    meta = benchmark.environment_info(threads)
    meta["suite"] = {"models": args.models, "quick": args.quick, **suite}
    print(f"hf_extras benchmark: {threads} threads, torch {meta['torch']}, transformers {meta['transformers']}"
          + (f", load average {meta['load_average'][0]:.2f}" if "load_average" in meta else ""), flush=True)
    if meta.get("load_average") and meta["load_average"][0] > 0.5 * meta["available_cores"]:
        print(f"WARNING: the machine is busy (load average {meta['load_average'][0]:.2f} on {meta['available_cores']} "
              "cores); timings will be noisy and multi-threaded steps can slow down many times over. "
              "Run on a quiet machine for numbers worth keeping.", flush=True)
    start = time.perf_counter()
    rows = benchmark.run_suite(families=args.models, threads=threads, isolate=not args.no_isolate,
                               progress=lambda message: print(message, flush=True), **suite)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    paths = benchmark.write_report(rows, args.out, meta)
    print()
    print(benchmark.format_tables(rows))
    print("wrote " + ", ".join(paths.values()))
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
