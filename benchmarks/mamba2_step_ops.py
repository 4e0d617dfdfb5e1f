"""Where a Mamba-2 training step goes: the time of every operator of one step, at the sizes of
`benchmarks/mamba2_vs_transformers.py` (width 256, 4 layers, 8 heads of 64, state 128, vocab 1024), one thread.

Each operator is timed by wall clock around its call (a `TorchDispatchMode`, below autograd, so the backward's
operators are seen too), averaged over `--steps` steps after warm-up steps. Why not `torch.profiler`: on this kind of
machine it inflated the memory-bound operators several times (a 4 MB copy at 4 ms instead of 0.5 ms), while the mode
costs a few microseconds per call. Printed: the step's wall time with and without the mode, the share of GEMMs, and
the operators by total time.

    python benchmarks/mamba2_step_ops.py --threads 1

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm")


class OpTimer(TorchDispatchMode):
    """Wall time and calls per (operator, first input shapes)."""

    def __init__(self):
        super().__init__()
        self.time: dict[tuple, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        key = (
            str(func).replace(".default", ""),
            tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:2],
        )
        self.time[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model and step of the benchmark beside this one
    from mamba2_vs_transformers import STATE, VOCAB, build, train_step

    torch.set_num_threads(args.threads)
    _, model = build(STATE, 1)
    ids = torch.randint(0, VOCAB, (1, args.seq_len))
    for _ in range(3):
        train_step(model, ids)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, ids)
    plain = (time.perf_counter() - start) / args.steps
    timer = OpTimer()
    start = time.perf_counter()
    with timer:
        for _ in range(args.steps):
            train_step(model, ids)
    timed = (time.perf_counter() - start) / args.steps
    per_step = {key: value / args.steps for key, value in timer.time.items()}
    total = sum(per_step.values())
    gemm = sum(value for key, value in per_step.items() if key[0].startswith(GEMMS))
    print(f"# T={args.seq_len}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"step {plain * 1e3:.0f} ms ({timed * 1e3:.0f} ms timed); in operators {total * 1e3:.0f} ms, GEMMs {gemm * 1e3:.0f} ms"
    )
    print("\n| ms per step | calls | operator | first inputs |\n| ---: | ---: | --- | --- |")
    for key, value in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {value * 1e3:.2f} | {timer.calls[key] // args.steps} | {key[0]} | {key[1]} |")


if __name__ == "__main__":
    main()
