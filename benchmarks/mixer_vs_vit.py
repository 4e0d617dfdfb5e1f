"""Images/s of `MlpMixerForImageClassification` against transformers' `ViTForImageClassification`, on CPU.

Both models get the same width, depth and patch size (a Mixer preset: S/16 by default) at the same image size
(224 px), the same batch and the same number of threads, and are measured in one run, interleaved step by step
(Mixer, ViT, Mixer, ViT, ...) so that a change in machine load hits both alike. The ViT has `hidden_size / 64`
attention heads (ViT's 64-wide heads), an FFN as wide as the Mixer's channel MLP (4x), SDPA attention, a CLS token and
learned position embeddings, as in `ViTForImageClassification`.

* inference: `model(pixel_values)` under `torch.inference_mode()` in eval mode;
* training: forward with labels, backward, `AdamW.step()`, `zero_grad()` in train mode.

Each number is the median over `--steps` timed steps after `--warmup` untimed ones, in images per second.

    python benchmarks/mixer_vs_vit.py                          # Mixer-S/16 vs ViT (512 wide, 8 deep, /16), 224 px
    python benchmarks/mixer_vs_vit.py --preset B/16 --batch-size 4 --out runs/bench_mixer_b16

Writes `results.json` and `mixer_vs_vit.png` into `--out` (default `benchmarks/results/mixer_vs_vit`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

import hf_extras  # noqa: F401  (registers the family)
from hf_extras import MlpMixerConfig, MlpMixerForImageClassification


def build_models(preset: str, image_size: int, num_labels: int) -> dict[str, torch.nn.Module]:
    """The Mixer preset and a ViT of the same width, depth, patch size, FFN width and image size."""
    mixer_config = MlpMixerConfig.from_preset(preset, image_size=image_size, num_labels=num_labels)
    vit_config = ViTConfig(
        hidden_size=mixer_config.hidden_size,
        num_hidden_layers=mixer_config.num_hidden_layers,
        num_attention_heads=max(1, mixer_config.hidden_size // 64),
        intermediate_size=mixer_config.channels_mlp_dim,
        image_size=image_size,
        patch_size=mixer_config.patch_size,
        num_channels=3,
        num_labels=num_labels,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    vit_config._attn_implementation = "sdpa"
    return {
        f"Mixer-{preset}": MlpMixerForImageClassification(mixer_config),
        f"ViT (same dims, /{mixer_config.patch_size})": ViTForImageClassification(vit_config),
    }


def _inference_step(model, pixel_values, labels, optimizer):
    with torch.inference_mode():
        model(pixel_values=pixel_values)


def _training_step(model, pixel_values, labels, optimizer):
    loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(models: dict[str, torch.nn.Module], mode: str, batch_size: int, image_size: int, steps: int, warmup: int,
            num_labels: int, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Median images/s per model for `mode` ("inference" or "training"), models interleaved step by step."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
    step = _inference_step if mode == "inference" else _training_step
    optimizers = {}
    for name, model in models.items():
        model.train(mode == "training")
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "training" else None
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, model in models.items():
            start = time.perf_counter()
            step(model, pixel_values, labels, optimizers[name])
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    for optimizer in optimizers.values():
        if optimizer is not None:
            optimizer.state.clear()
    return {name: batch_size / statistics.median(values) for name, values in times.items()}


def format_table(rows: list[dict], baseline: str) -> str:
    lines = [
        "| model | parameters | inference images/s | training images/s | inference vs ViT | training vs ViT |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = next(r for r in rows if r["model"] == baseline)
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['inference_images_per_s']:.2f} | "
            f"{row['training_images_per_s']:.2f} | {row['inference_images_per_s'] / base['inference_images_per_s']:.2f}x | "
            f"{row['training_images_per_s'] / base['training_images_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def save_plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=120)
    ax = fig.subplots()
    modes = ("inference_images_per_s", "training_images_per_s")
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(modes))]
        bars = ax.bar(xs, [row[m] for m in modes], width, label=row["model"])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(modes)), ["inference", "training step"])
    ax.set_ylabel("images / s (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="S/16", help="Mixer preset: S/16, B/16, L/16 (or /32)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and mode (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-labels", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/mixer_vs_vit")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = build_models(args.preset, args.image_size, args.num_labels)
    baseline = list(models)[1]
    inference = measure(models, "inference", args.batch_size, args.image_size, args.steps, args.warmup, args.num_labels)
    training = measure(models, "training", args.batch_size, args.image_size, args.steps, args.warmup, args.num_labels)
    rows = [
        {
            "model": name,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "inference_images_per_s": inference[name],
            "training_images_per_s": training[name],
        }
        for name, model in models.items()
    ]
    meta = {
        "preset": args.preset,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    title = (
        f"Mixer-{args.preset} vs ViT, {args.image_size} px, batch {args.batch_size}, "
        f"{meta['threads']} CPU threads (median of {args.steps})"
    )
    print(title)
    print(format_table(rows, baseline))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if not args.no_plot:
        save_plot(rows, out / "mixer_vs_vit.png", title)
    print(f"results: {out / 'results.json'}")
    return rows


if __name__ == "__main__":
    main()
