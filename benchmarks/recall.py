"""Multi-query associative recall (MQAR): pure linear stacks vs Llama vs 3:1 hybrids, accuracy vs context length.

Each example is `k1 v1 k2 v2 ... kN vN q1 q2 ... qN`: N key-value pairs, then every key once more in a random order
(Zoology's MQAR, Arora et al. 2023, with the queries back to back). Keys and values come from disjoint token ranges,
generated on the fly (nothing downloaded). The loss and the accuracy count only the answers: at query `q_i` the
model must predict its value, so every example gives N answers. Training follows a curriculum: the largest pair count
stays at `--start-pairs` for a quarter of the steps, then grows to the largest of `--pairs` by three quarters, each
batch drawing its pair count uniformly up to it (tokens per step fixed). Accuracy is then measured per pair count (context length T = 3 N). A linear stack
must compress all pairs into a fixed-size state; a softmax attention layer can look the key up, which is why a few
buy recall back.

The models are those of `hf-extras bench` (`hf_extras.bench.MODELS`: Llama with SDPA, the hf_extras families and
their `_hybrid` 3:1 schedules, FFN widths matched to Llama's parameter count), here at a small width and depth with
the task's vocabulary. Each model trains in its own process (one torch thread each, `--workers` at a time).

    python benchmarks/recall.py [--models llama gla ...] [--pairs 8 16 32 64] [--steps 2000] [--json out.json]

No result here is a test; keep runs short on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from hf_extras.bench import MODELS, Dims

SPECIAL = 3  # pad / eos / bos ids of the benchmark models
IGNORE = -100
DEFAULT_MODELS = ["llama", "retnet", "gla", "gated_deltanet", "retnet_hybrid", "gla_hybrid", "gated_deltanet_hybrid"]


def mqar_batch(
    batch_size: int, pairs: int, num_keys: int, num_values: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, labels)` of shape (batch, 3 * pairs): N pairs, then the N keys again in a random order; labels hold each
    query's value at the query's position (the logits at position t predict token t + 1), `IGNORE` elsewhere. The
    answers are not in the input, so a query cannot be answered by elimination from earlier answers."""
    if pairs > num_keys:
        raise ValueError(f"`pairs` ({pairs}) must not exceed the number of distinct keys `--keys` ({num_keys}).")
    keys = torch.rand(batch_size, num_keys, generator=generator).argsort(-1)[:, :pairs] + SPECIAL
    values = torch.randint(0, num_values, (batch_size, pairs), generator=generator) + SPECIAL + num_keys
    order = torch.rand(batch_size, pairs, generator=generator).argsort(-1)
    context = torch.stack([keys, values], -1).flatten(1)
    ids = torch.cat([context, keys.gather(1, order)], 1)
    labels = torch.cat([torch.full_like(context, IGNORE), values.gather(1, order)], 1)
    return ids, labels


def answer_loss_and_hits(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the answer positions only, and a boolean per answer: argmax == the value."""
    logits = model(input_ids=ids, use_cache=False).logits
    mask = labels != IGNORE
    picked, target = logits[mask], labels[mask]
    return torch.nn.functional.cross_entropy(picked, target), picked.argmax(-1) == target


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def curriculum_pairs(step: int, args, generator: torch.Generator) -> int:
    """The batch's pair count, uniform in [`--start-pairs`, top]: top stays at `--start-pairs` for the first
    `--hold` fraction of the steps (where attention forms its lookup circuit on short inputs), then grows linearly to
    max(`--pairs`) until `--grow-until`, then the whole range."""
    low, high = args.start_pairs, max(args.pairs)
    progress = (step / args.steps - args.hold) / max(1e-9, args.grow_until - args.hold)
    top = low + (high - low) * min(1.0, max(0.0, progress))
    return int(torch.randint(low, int(top) + 1, (1,), generator=generator))


def train_and_evaluate(name: str, args) -> dict:
    """Train model `name` from scratch on MQAR, then its accuracy per pair count on fresh examples."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = SPECIAL + args.keys + args.values
    dims = Dims(args.hidden_size, args.layers, args.heads, vocab_size=vocab, max_positions=3 * max(args.pairs))
    model = MODELS[name].build(dims)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start, log = time.perf_counter(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        pairs = curriculum_pairs(step, args, generator)
        batch_size = max(1, args.tokens_per_step // (3 * pairs))  # same tokens (and answers) in every step
        ids, labels = mqar_batch(batch_size, pairs, args.keys, args.values, generator)
        loss, hits = answer_loss_and_hits(model, ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.log_every == 0:  # a host sync only every `log_every` steps
            entry = dict(
                step=step + 1, pairs=pairs, loss=round(loss.item(), 4), acc=round(hits.float().mean().item(), 4)
            )
            entry["s"] = round(time.perf_counter() - start, 1)
            log.append(entry)
            print(f"{name:>22} {entry}", flush=True)
    train_s = time.perf_counter() - start
    model.eval()
    accuracy = {}
    test_generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for pairs in args.pairs:
            ids, labels = mqar_batch(args.eval_size, pairs, args.keys, args.values, test_generator)
            accuracy[pairs] = round(answer_loss_and_hits(model, ids, labels)[1].float().mean().item(), 4)
    params = sum(p.numel() for p in model.parameters())
    return dict(
        model=name, label=MODELS[name].label, accuracy=accuracy, train_s=round(train_s, 1), params=params, log=log
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--pairs", nargs="+", type=int, default=[8, 16, 32, 64], help="pair counts evaluated")
    parser.add_argument("--start-pairs", type=int, default=2, help="smallest pair count of the training curriculum")
    parser.add_argument("--hold", type=float, default=0.25, help="fraction of steps at --start-pairs only")
    parser.add_argument("--grow-until", type=float, default=0.75, help="fraction of steps when max pairs is reached")
    parser.add_argument("--keys", type=int, default=64, help="distinct key tokens (>= max pairs)")
    parser.add_argument("--values", type=int, default=64, help="distinct value tokens (chance = 1 / values)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="batch size = this / (3 * pairs)")
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    parser.add_argument("--workers", type=int, default=2, help="models trained at once, one process each")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--json", help="write the results (and the settings) to this JSON file")
    args = parser.parse_args(argv)
    if max(args.pairs) > args.keys:
        parser.error(f"--keys ({args.keys}) must be at least the largest --pairs ({max(args.pairs)}).")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    context = get_context("spawn")  # fresh interpreters: no fork of a process that already ran torch
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        results = list(pool.map(train_and_evaluate, args.models, [args] * len(args.models)))
    wall_s = time.perf_counter() - start
    print(f"\n| model | {' | '.join(f'{p} pairs (T={3 * p})' for p in args.pairs)} | train s |")
    print(f"| --- |{' ---: |' * len(args.pairs)} ---: |")
    for result in results:
        cells = " | ".join(f"{result['accuracy'][p]:.3f}" for p in args.pairs)
        print(f"| {result['label']} | {cells} | {result['train_s']:.0f} |")
    print(f"chance {1 / args.values:.3f}; wall {wall_s:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        meta = dict(settings=settings, chance=1 / args.values, wall_s=round(wall_s, 1), torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
