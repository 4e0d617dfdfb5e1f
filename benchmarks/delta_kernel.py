"""CPU kernel benchmark: our chunkwise gated delta rule vs transformers' `torch_chunk_gated_delta_rule` (Qwen3-Next).

Forward + backward of the kernel alone (gated: a data-dependent per-head decay), float32, one thread by default,
B=1, H=4, Dk=Dv=64; transformers at its chunk 64, ours at chunks 64 and 32 (32 is faster on CPU). The two implementations run in interleaved rounds (ours, theirs, ours, ...) so a
machine whose load changes during the run slows both alike; each reports its best round and its median round, and
the speed-ups of both.
Both get the same inputs: L2-normalised q and k, `beta = sigmoid(.)`, log decays `logsigmoid(. + 3)`;
transformers' function scales q by `Dk ** -0.5` itself, ours takes `scale=Dk ** -0.5`.

    python benchmarks/delta_kernel.py [--lengths 2048 8192] [--rounds 5] [--threads 1] [--heads 4 --head-dim 64]
                                      [--chunk-sizes 64 32]

Prints one line per length: milliseconds of each, and our speed-up over transformers in brackets. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

from hf_extras.models.delta_ops import gated_delta_rule


def _inputs(T: int, heads: int, head_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, heads, T, head_dim, generator=g), dim=-1)
    k = F.normalize(torch.randn(1, heads, T, head_dim, generator=g), dim=-1)
    v = torch.randn(1, heads, T, head_dim, generator=g)
    beta = torch.sigmoid(torch.randn(1, heads, T, generator=g))
    log_decay = F.logsigmoid(torch.randn(1, heads, T, generator=g) + 3.0)
    return [x.requires_grad_() for x in (q, k, v, beta, log_decay)]


def _ours(chunk_size: int):
    def fn(q, k, v, beta, log_decay):
        o, _ = gated_delta_rule(
            q, k, v, beta, log_decay, mode="chunkwise", chunk_size=chunk_size, scale=q.shape[-1] ** -0.5
        )
        return o

    return fn


def _theirs(q, k, v, beta, log_decay):
    # transformers' layout is time-first (B, T, H, D) / (B, T, H)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    o, _ = torch_chunk_gated_delta_rule(t(q), t(k), t(v), g=t(log_decay), beta=t(beta), chunk_size=64)
    return o.transpose(1, 2)


def _once(fn, inputs) -> float:
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    fn(*inputs).sum().backward()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each side reports its best")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=[64, 32], help="ours at each (transformers runs at 64)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, B=1 H={args.heads} D={args.head_dim}")
    for T in args.lengths:
        inputs = _inputs(T, args.heads, args.head_dim)
        fns = {f"ours chunk {c}": _ours(c) for c in args.chunk_sizes}
        fns["transformers"] = _theirs
        with torch.no_grad():  # same numbers first (so the comparison is of equal work)
            ref = _theirs(*inputs)
            diff = max((fn(*inputs) - ref).abs().max().item() for fn in fns.values())
        times = {name: [] for name in fns}
        for fn in fns.values():  # warm-up
            _once(fn, inputs)
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(_once(fn, inputs))
        best = {name: min(ts) * 1e3 for name, ts in times.items()}
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        theirs, theirs_med = best.pop("transformers"), med.pop("transformers")
        row = "  ".join(
            f"{name} {ms:7.1f} ms ({theirs / ms:4.2f}x; median {med[name]:.1f} ms, {theirs_med / med[name]:4.2f}x)"
            for name, ms in best.items()
        )
        print(
            f"T={T:6d}  transformers {theirs:7.1f} ms (median {theirs_med:.1f})  {row}  (max |diff| {diff:.1e}, "
            f"{args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()
