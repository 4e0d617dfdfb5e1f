"""Eager vs `torch.compile` training-step time of each family's causal LM (and the bare chunkwise kernels), on CPU.

Both versions of a model live in one process and are stepped round-robin (eager, compiled, eager, compiled, ...)
after the compile warm-up, so machine load hits both alike; the figure is the median step time of each and their
ratio. A step is forward + backward + AdamW on a fixed random batch (`hf_extras.bench.TrainStep`, as in `hf-extras bench`).

    python benchmarks/compile_speed.py [--seq-len 1024] [--batch-size 2] [--rounds 5] [--families retnet gla ...]

Measured (dev CPU shared with other jobs and the test suite, torch 2.13, Inductor, 2 threads, hidden 256, 4 layers,
4 heads, `--seq-len 512` x batch 2, float32; median of 5 interleaved rounds; Mamba compiles with one graph break,
see tests/test_compile.py). The run was stopped after GLA (each model's compile took 5-7 minutes under this load):

    | model                                        | eager s/step | compiled s/step | speed-up | compile s | load avg |
    | kernel: chunkwise retention (per-head gate)  |        0.719 |           0.170 |    4.23x |        76 |      7.6 |
    | retnet (causal LM, forward+backward+AdamW)   |       18.221 |          11.070 |    1.65x |       312 |      6.1 |
    | gla (causal LM, per-key gate, short conv)    |        5.407 |           4.769 |    1.13x |       428 |      6.6 |
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from hf_extras.bench import FAMILY_NAMES, TrainStep, family_causal_lm
from hf_extras.models.retention_ops import chunkwise_retention


def _round_robin(steps: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds per step of each callable, stepped in turn `rounds` times."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(name: str, seq_len: int, batch_size: int, rounds: int) -> dict[str, float]:
    eager = TrainStep(family_causal_lm(name), seq_len, batch_size)
    compiled = TrainStep(family_causal_lm(name), seq_len, batch_size)
    compiled.model = torch.compile(compiled.model)
    start = time.perf_counter()
    compiled.step()  # compile (forward and backward graphs)
    compile_s = time.perf_counter() - start
    eager.step()
    result = _round_robin({"eager": eager.step, "compiled": compiled.step}, rounds)
    return {**result, "compile_s": compile_s}


def bench_kernel(seq_len: int, rounds: int) -> dict[str, float]:
    q, k, v = (torch.randn(2, 4, seq_len, 64, requires_grad=True) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(2, 4, seq_len) + 3).requires_grad_()

    def kernel(q, k, v, g):
        return chunkwise_retention(q, k, v, g, chunk_size=64)[0]

    compiled_kernel = torch.compile(kernel, fullgraph=True)

    def step(fn):
        return lambda: fn(q, k, v, g).sum().backward()

    start = time.perf_counter()
    step(compiled_kernel)()
    compile_s = time.perf_counter() - start
    return {**_round_robin({"eager": step(kernel), "compiled": step(compiled_kernel)}, rounds), "compile_s": compile_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=FAMILY_NAMES)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"seq {args.seq_len} x batch {args.batch_size}, {args.threads} threads, {args.rounds} rounds")
    print("| model | eager s/step | compiled s/step | speed-up | compile s | load average |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [("kernel: chunkwise retention (per-head gate)", lambda: bench_kernel(args.seq_len, args.rounds))]
    rows += [
        (name, lambda name=name: bench_model(name, args.seq_len, args.batch_size, args.rounds))
        for name in args.families
    ]
    for label, run in rows:
        torch._dynamo.reset()
        r = run()
        cells = [
            label,
            f"{r['eager']:.3f}",
            f"{r['compiled']:.3f}",
            f"{r['eager'] / r['compiled']:.2f}x",
            f"{r['compile_s']:.0f}",
            f"{os.getloadavg()[0]:.1f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
