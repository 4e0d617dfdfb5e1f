"""CPU kernel benchmark: our chunkwise gated delta rule vs transformers' `torch_chunk_gated_delta_rule` (Qwen3-Next).

Forward + backward of the kernel alone (gated: a data-dependent per-head decay), float32, one thread by default,
B=1, H=4, Dk=Dv=64, chunk 64. The two implementations run in interleaved rounds (ours, theirs, ours, ...) so a
machine whose load changes during the run slows both alike; each reports its best round (best-of-N).
Both get the same inputs: L2-normalised q and k, `beta = sigmoid(.)`, log decays `logsigmoid(. + 3)`;
transformers' function scales q by `Dk ** -0.5` itself, ours takes `scale=Dk ** -0.5`.

    python benchmarks/delta_kernel.py [--lengths 2048 8192] [--rounds 5] [--threads 1] [--heads 4 --head-dim 64]

Prints one line per length: milliseconds of each and the speed-up. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
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


def _ours(q, k, v, beta, log_decay):
    o, _ = gated_delta_rule(q, k, v, beta, log_decay, mode="chunkwise", chunk_size=64, scale=q.shape[-1] ** -0.5)
    return o


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, B=1 H={args.heads} D={args.head_dim}")
    for T in args.lengths:
        inputs = _inputs(T, args.heads, args.head_dim)
        # same numbers first (so the comparison is of equal work)
        with torch.no_grad():
            diff = (_ours(*inputs) - _theirs(*inputs)).abs().max().item()
        _once(_ours, inputs), _once(_theirs, inputs)  # warm-up
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(_once(_ours, inputs))
            theirs.append(_once(_theirs, inputs))
        a, b = min(ours) * 1e3, min(theirs) * 1e3
        print(
            f"T={T:6d}  ours chunkwise {a:9.1f} ms  transformers torch_chunk_gated_delta_rule {b:9.1f} ms  "
            f"speed-up {b / a:5.2f}x  (max |diff| {diff:.1e}, best of {args.rounds})"
        )


if __name__ == "__main__":
    main()
