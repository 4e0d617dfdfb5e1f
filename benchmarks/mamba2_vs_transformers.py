"""HfxMamba2 vs transformers' Mamba2ForCausalLM (its CPU path: `torch_forward`, chunked SSD in PyTorch), one run.

Both models have the same weights (ours is imported from theirs with `hf_extras.convert.import_transformers_mamba2`,
and the logits are checked equal before timing): width 256, 4 layers, expand 2, head_dim 64 (8 heads), state 128,
1 group, conv 4, vocab 1024 (transformers' Mamba-2 defaults except the sizes). transformers runs its default
`chunk_size` 256; ours its default 64 (the chunk length changes no number beyond float rounding).

Measured at each `--lengths` (default 512 and 2048), batch `--batch`:
* training step: forward with `labels` + backward (no optimizer);
* inference: forward, `use_cache=False`, no grad.

Timing is interleaved: each round runs one step of each model, `--repeats` rounds after one warm-up step each, so
background load hits both alike; the minimum and the median are reported, and the ratios (transformers / ours, > 1
means ours is faster) of both.

    python benchmarks/mamba2_vs_transformers.py --threads 1
    python benchmarks/mamba2_vs_transformers.py --threads 1 --lengths 512 --repeats 3     # a quick look

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

VOCAB, HIDDEN, LAYERS, HEAD_DIM, STATE, GROUPS = 1024, 256, 4, 64, 128, 1


def build(state_size: int, n_groups: int):
    """transformers' Mamba2ForCausalLM and the HfxMamba2ForCausalLM imported from it (same weights)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from transformers.utils import logging

    from hf_extras.convert import import_transformers_mamba2

    logging.set_verbosity_error()  # the "falling back to its reference PyTorch implementation" notices
    torch.manual_seed(0)
    config = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_heads=2 * HIDDEN // HEAD_DIM,
        head_dim=HEAD_DIM,
        state_size=state_size,
        n_groups=n_groups,
        use_cache=False,
    )
    theirs = Mamba2ForCausalLM(config)
    ours = import_transformers_mamba2(theirs, use_cache=False)
    return theirs, ours


def train_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def infer_step(model, ids):
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def fmt_s(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up step each)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--state-size", type=int, default=STATE)
    parser.add_argument("--n-groups", type=int, default=GROUPS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start"
    )
    theirs, ours = build(args.state_size, args.n_groups)
    print(f"# {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters each")
    check = torch.randint(0, VOCAB, (1, 300))
    with torch.no_grad():
        a, b = theirs.eval()(check).logits, ours.eval()(check).logits
    rel = ((a - b).abs().max() / a.abs().max()).item()
    print(f"# logits max relative difference at T=300: {rel:.1e}")

    models = {"transformers": theirs, "hf_extras": ours}
    results = {"args": vars(args), "logits_rel_diff": rel, "times": {}}
    for length in args.lengths:
        ids = torch.randint(0, VOCAB, (args.batch, length))
        for phase, step in (("train", train_step), ("infer", infer_step)):
            runs = {name: [] for name in models}
            for model in models.values():  # warm-up
                step(model, ids)
            for _ in range(args.repeats):
                for name, model in models.items():
                    runs[name].append(timed(step, model, ids))
            row = {name: {"min": min(v), "median": statistics.median(v), "all": v} for name, v in runs.items()}
            results["times"][f"{phase}@{length}"] = row
            hf, hfx = row["transformers"], row["hf_extras"]
            print(
                f"{phase:5s} T={length:5d}: transformers {fmt_s(hf['min'])} (median {fmt_s(hf['median'])}) | "
                f"hf_extras {fmt_s(hfx['min'])} (median {fmt_s(hfx['median'])}) | "
                f"speed-up {hf['min'] / hfx['min']:.2f}x (medians {hf['median'] / hfx['median']:.2f}x)",
                flush=True,
            )
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    print()
    print("| phase | T | transformers Mamba2 (CPU) | HfxMamba2 | speed-up (min) | speed-up (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, row in results["times"].items():
        phase, length = key.split("@")
        hf, hfx = row["transformers"], row["hf_extras"]
        tok = args.batch * int(length)
        print(
            f"| {phase} | {length} | {fmt_s(hf['min'])} | {fmt_s(hfx['min'])} ({tok / hfx['min']:,.0f} tok/s) | "
            f"{hf['min'] / hfx['min']:.2f}x | {hf['median'] / hfx['median']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
