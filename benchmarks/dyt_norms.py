"""Forward+backward time of one DyT-family model with `norm_type` dyt, layernorm and rmsnorm, eager and compiled.

Everything is measured in one run on one machine, same weights (same seed), same batch:

* `model`: a full `DyTForCausalLM` step (forward with `labels`, backward), `--steps` timed steps after `--warmup`
  untimed ones (the compiled variant's first call, which compiles, is reported separately); the three norm types
  are timed round-robin, one step each per round, so background load hits them alike; median and minimum reported;
* `norm`: the norm layer alone, forward+backward on the `(batch * seq, hidden)` activations of that model, the
  place where the paper's claim ("DyT is faster than RMSNorm/LayerNorm without compilation, equal with it";
  Zhu et al. 2025, Sec. 6 "Efficiency of DyT", LLaMA 7B on an H100) lives before matmuls dilute it.

Implementations compared: DyT is `weight * tanh(alpha * x) + bias` in plain PyTorch (four element-wise kernels in
eager mode); LayerNorm is `torch.nn.LayerNorm` (one native fused kernel); RMSNorm is LLaMA's plain-PyTorch form
(float32 upcast, mean of squares, rsqrt, two multiplies). So "eager" compares unfused DyT against a fused LayerNorm
and an unfused RMSNorm, as in the paper's LLaMA code base.

    python benchmarks/dyt_norms.py                               # CPU defaults (small, takes a few minutes)
    python benchmarks/dyt_norms.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8 --seq 1024 --batch 8

Ratios are reported as time(norm) / time(reference); < 1 means faster than the reference. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import hf_extras
from hf_extras import DyTConfig, DyTForCausalLM

NORMS = ("dyt", "layernorm", "rmsnorm")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(norm_type: str, args) -> DyTForCausalLM:
    torch.manual_seed(0)
    config = DyTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_heads=args.heads,
        norm_type=norm_type,
        ffn_type="glu",
        position_embedding_type="rotary",
        use_cache=False,
    )
    model = DyTForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    model.set_attn_implementation(args.attn)
    return model.train()


def model_step(norm_type: str, compiled: bool, args, ids: torch.Tensor):
    model = build(norm_type, args)
    run = torch.compile(model, dynamic=False) if compiled else model

    def step():
        run(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def norm_step(norm_type: str, compiled: bool, args, ids: torch.Tensor):
    layer = build(norm_type, args).model.layers[0].mixer_norm
    torch.manual_seed(1)
    x = torch.randn(args.batch * args.seq, args.hidden, device=args.device, dtype=getattr(torch, args.dtype))
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    run = torch.compile(layer, dynamic=False) if compiled else layer

    def step():
        run(x).backward(grad)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    return step


def measure(what: str, compiled: bool, args, ids: torch.Tensor) -> list[dict]:
    """Time the three norm types round-robin (one step of each per round), so that load from other processes on a
    shared machine hits all three alike; report the median and the minimum per step."""
    make = model_step if what == "model" else norm_step
    steps = args.steps if what == "model" else args.norm_steps
    fns, first = {}, {}
    for norm in NORMS:
        fns[norm] = make(norm, compiled, args, ids)
        sync(args.device)
        start = time.perf_counter()
        fns[norm]()  # compiles when compiled
        sync(args.device)
        first[norm] = time.perf_counter() - start
        for _ in range(max(args.warmup - 1, 0)):
            fns[norm]()
    times = {norm: [] for norm in NORMS}
    for _ in range(steps):
        for norm in NORMS:
            sync(args.device)
            start = time.perf_counter()
            fns[norm]()
            sync(args.device)
            times[norm].append(time.perf_counter() - start)
    rows = []
    for norm in NORMS:
        row = {
            "what": what,
            "norm": norm,
            "compiled": compiled,
            "first_s": first[norm],
            "median_ms": 1e3 * statistics.median(times[norm]),
            "min_ms": 1e3 * min(times[norm]),
        }
        rows.append(row)
        print(
            f"# {what:5s} {norm:9s} {'compiled' if compiled else 'eager':8s} median {row['median_ms']:9.3f} ms, "
            f"min {row['min_ms']:9.3f} ms (first call {first[norm]:.2f} s)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def table(rows: list[dict], what: str, stat: str = "median_ms") -> str:
    by = {(r["norm"], r["compiled"]): r[stat] for r in rows if r["what"] == what}
    modes = sorted({c for _, c in by})
    lines = [
        "| norm | "
        + " | ".join(f"{'compiled' if c else 'eager'} ms | vs layernorm | vs rmsnorm" for c in modes)
        + " |",
        "|---|" + "---:|---:|---:|" * len(modes),
    ]
    for norm in NORMS:
        cells = []
        for c in modes:
            ms = by[(norm, c)]
            cells += [f"{ms:.3f}", f"{ms / by[('layernorm', c)]:.3f}", f"{ms / by[('rmsnorm', c)]:.3f}"]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    if len(modes) == 2:
        lines.append("")
        lines.append("compiled / eager: " + ", ".join(f"{n} {by[(n, True)] / by[(n, False)]:.3f}" for n in NORMS))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--vocab", type=int, default=264)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--norm-steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ids = torch.randint(7, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(
        args.device
    )
    modes = (False,) if args.no_compile else (False, True)
    rows = [row for compiled in modes for what in ("norm", "model") for row in measure(what, compiled, args, ids)]

    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    )
    print(
        f"DyT-family model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, GLU FFN, rotary, "
        f"batch {args.batch} x seq {args.seq}, {args.dtype}, attention {args.attn}; device {args.device} ({device}), "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, hf_extras {hf_extras.__version__}\n"
    )
    for what, title in (("model", "Whole model"), ("norm", "Norm layer alone, on (batch*seq, hidden)")):
        for stat in ("median_ms", "min_ms"):
            print(f"{title}, forward + backward, {stat.split('_')[0]} ms per step:\n")
            print(table(rows, what, stat) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
