"""Synthetic associative recall: pure linear stacks vs Llama vs 3:1 hybrids, accuracy vs context length.

Each example is `k1 v1 k2 v2 ... kN vN SEP kq` and the model must emit `vq`, the value paired with the queried key
(keys and values drawn from disjoint token ranges, generated on the fly, nothing downloaded). Every model is a
causal LM of the same width and depth trained briefly on a mix of lengths; the loss is on the answer token only.
Accuracy is then measured per number of pairs (context length = 2 * pairs + 2). A linear stack must compress all
pairs into a fixed-size state; a softmax attention layer can look the key up, which is why a few buy recall back.

    python benchmarks/recall.py [--steps 300] [--pairs 8 16 32 64] [--models retnet gla gated_deltanet llama ...]

Keep runs short on a shared CPU (the defaults take minutes per model); no result here is a test.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import hf_extras
from hf_extras.models.hybrid import hybrid_schedule

VOCAB, KEYS, VALUES, SEP = 128, range(4, 64), range(64, 128), 3


def recall_batch(batch_size: int, pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, answer)`: `ids` (batch, 2 * pairs + 2) ending in the queried key; `answer` (batch,) its value."""
    keys = torch.stack([torch.randperm(len(KEYS), generator=generator)[:pairs] for _ in range(batch_size)]) + KEYS[0]
    values = torch.randint(VALUES[0], VALUES[-1] + 1, (batch_size, pairs), generator=generator)
    query = torch.randint(0, pairs, (batch_size,), generator=generator)
    context = torch.stack([keys, values], -1).flatten(1)
    rows = torch.arange(batch_size)
    ids = torch.cat([context, torch.full((batch_size, 1), SEP), keys[rows, query, None]], 1)
    return ids, values[rows, query]


def build(name: str, hidden: int, layers: int, heads: int) -> torch.nn.Module:
    """A causal LM by benchmark name: `retnet`, `gla`, `gated_deltanet`, `llama`, or `<linear>_hybrid` (3:1)."""
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, pad_token_id=0)
    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=8 * ((8 * hidden // 3 + 7) // 8),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=1024,
            pad_token_id=0,
        )
        return transformers.LlamaForCausalLM(config)
    base, hybrid = name.removesuffix("_hybrid"), name.endswith("_hybrid")
    if hybrid:
        common["layer_types"] = hybrid_schedule("3:1", layers)
    if base == "retnet":
        return hf_extras.RetNetForCausalLM(hf_extras.RetNetConfig(**common))
    if base == "gla":
        return hf_extras.GatedRetentionForCausalLM(hf_extras.GatedRetentionConfig(gate="key", **common))
    if base == "gated_deltanet":
        return hf_extras.GatedDeltaNetForCausalLM(hf_extras.GatedDeltaNetConfig(gate="head", **common))
    raise ValueError(f"Unknown model {name!r}.")


def answer_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[:, -1]


def train_and_evaluate(name: str, args) -> dict[int, float]:
    torch.manual_seed(args.seed)
    model = build(name, args.hidden_size, args.layers, args.heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        pairs = args.pairs[step % len(args.pairs)]
        ids, answer = recall_batch(args.batch_size, pairs, generator)
        loss = torch.nn.functional.cross_entropy(answer_logits(model, ids), answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    accuracy = {}
    test_generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for pairs in args.pairs:
            ids, answer = recall_batch(args.eval_size, pairs, test_generator)
            accuracy[pairs] = (answer_logits(model, ids).argmax(-1) == answer).float().mean().item()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["retnet", "gla", "gated_deltanet", "llama", "retnet_hybrid", "gla_hybrid", "gated_deltanet_hybrid"],
    )
    parser.add_argument("--pairs", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"| model | {' | '.join(f'{p} pairs (T={2 * p + 2})' for p in args.pairs)} | train s |")
    print(f"| --- |{' --- |' * len(args.pairs)} --- |")
    for name in args.models:
        start = time.perf_counter()
        accuracy = train_and_evaluate(name, args)
        seconds = time.perf_counter() - start
        cells = " | ".join(f"{accuracy[p]:.3f}" for p in args.pairs)
        print(f"| {name} | {cells} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
