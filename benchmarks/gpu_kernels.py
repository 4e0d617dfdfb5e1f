"""GPU kernel benchmark: our chunkwise forms vs SDPA (flash attention) vs flash-linear-attention, bf16, 2k-16k tokens.

For each sequence length: forward and forward+backward time (median of CUDA-event timings after warm-up) of

* `sdpa`          -- `F.scaled_dot_product_attention(is_causal=True)` (PyTorch picks flash attention on Hopper),
* `ours/<decay>`  -- `retention_ops.chunkwise_retention` (pure PyTorch) with no / fixed / per-head / per-key decay,
* `fla/<decay>`   -- the same computation through `hf_extras.models.fla_dispatch` (fla's Triton kernels), when fla
                     is installed.

    python benchmarks/gpu_kernels.py [--lengths 2048 4096 8192 16384] [--batch 2 --heads 16 --head-dim 64]
                                     [--out benchmarks/results/gpu]

Writes `gpu_kernels.json` and `gpu_kernels.md` (with the card's name) into `--out`. Not yet measured: no GPU was
available when this was written; `scripts/gpu_check.sh` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from hf_extras.models.fla_dispatch import fla_decayed_linear_attention
from hf_extras.models.retention_ops import chunkwise_retention

DECAYS = ("none", "fixed", "head", "key")


def fla_installed() -> bool:
    """Whether flash-linear-attention's GLA kernels import (what hf_extras dispatches to on CUDA)."""
    try:
        from fla.ops.gla import chunk_gla  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception:  # not installed, or no working Triton
        return False
    return True


def _decay(kind: str, B: int, H: int, T: int, D: int, device):
    if kind == "none":
        return None
    if kind == "fixed":
        return torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, device=device, dtype=torch.float32)))
    shape = (B, H, T) if kind == "head" else (B, H, T, D)
    return (F.logsigmoid(torch.randn(shape, device=device) + 3) / (1 if kind == "head" else 16)).requires_grad_()


def _time(fn, backward: bool, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of `fn()` (and the backward of its output's sum)."""
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        if backward:
            out.float().sum().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(lengths, batch: int, heads: int, head_dim: int) -> list[dict]:
    device = torch.device("cuda")
    have_fla = fla_installed()
    rows = []
    for T in lengths:
        q, k, v = (
            torch.randn(batch, heads, T, head_dim, device=device, dtype=torch.bfloat16) * head_dim**-0.25
            for _ in range(3)
        )
        for x in (q, k, v):
            x.requires_grad_()
        cases = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for kind in DECAYS:
            g = _decay(kind, batch, heads, T, head_dim, device)
            cases[f"ours/{kind}"] = lambda g=g, q=q, k=k, v=v: chunkwise_retention(q, k, v, g, chunk_size=64)[0]
            if have_fla:
                cases[f"fla/{kind}"] = lambda g=g, q=q, k=k, v=v: fla_decayed_linear_attention(
                    q, k, v, g, mode="chunkwise"
                )[0]
        for name, fn in cases.items():
            row = {"kernel": name, "seq_len": T, "batch": batch, "heads": heads, "head_dim": head_dim}
            try:
                with torch.no_grad():
                    row["forward_ms"] = _time(fn, backward=False)
                row["train_ms"] = _time(fn, backward=True)
                row["train_tokens_per_s"] = batch * T / (row["train_ms"] / 1e3)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def to_markdown(rows: list[dict], device_name: str) -> str:
    lengths = sorted({r["seq_len"] for r in rows})
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    index = {(r["kernel"], r["seq_len"]): r for r in rows}
    lines = [
        f"GPU: {device_name}; bf16; forward / forward+backward ms (median)",
        "",
        "| kernel | " + " | ".join(f"{t // 1024}k" for t in lengths) + " |",
        "| --- |" + " ---: |" * len(lengths),
    ]
    for name in kernels:
        cells = []
        for t in lengths:
            r = index.get((name, t), {})
            cells.append(r.get("error") or f"{r['forward_ms']:.2f} / {r['train_ms']:.2f}" if r else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 1
    device_name = torch.cuda.get_device_name()
    rows = bench(args.lengths, args.batch, args.heads, args.head_dim)
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": device_name, "torch": torch.__version__, "fla": fla_installed()}
    with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = to_markdown(rows, device_name)
    with open(os.path.join(args.out, "gpu_kernels.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
