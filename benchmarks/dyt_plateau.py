"""Reproduce the DyT unigram plateau (README, "Seq2seq") and its fix: a small decoder-only LM on the E2E sentences.

Trains `DyTForCausalLM` (width 128, 4 layers, byte tokenizer) with AdamW for `--steps` steps and prints, every
`--every` steps, the loss, the std of the final norm's input and the fraction of it where `tanh(alpha x)` is
saturated (> 0.99). With the final DyT's weight starting at 1 (`dyt_final_weight_init=1.0`, the paper's value and
this package's default before the width rule) the residual grows ~100x in the first ~20-40 steps, the final DyT
saturates and the loss stays at the unigram entropy (~3.2). The default (the width rule: 4.42 at width 128) learns.

    python benchmarks/dyt_plateau.py --set dyt_final_weight_init=1.0   # the plateau
    python benchmarks/dyt_plateau.py                                   # DyT defaults: learns
    python benchmarks/dyt_plateau.py --set norm_type=layernorm         # the LayerNorm reference
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from hf_extras import DyTConfig, DyTForCausalLM
from hf_extras.data.tokenizer import build_byte_tokenizer


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "e2e_nlg_1k.jsonl")
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DyTConfig overrides")
    args = parser.parse_args()

    torch.manual_seed(0)
    tok = build_byte_tokenizer()
    rows = [json.loads(line) for line in open(args.data)][:800]
    seqs = [
        tok(r["meaning_representation"] + " => " + r["text"], add_special_tokens=False)["input_ids"][:300]
        + [tok.eos_token_id]
        for r in rows
    ]
    overrides = dict(item.split("=", 1) for item in args.set)
    config = DyTConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=4,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        **{k: parse_value(v) for k, v in overrides.items()},
    )
    model = DyTForCausalLM(config).train()
    final_in = {}
    model.model.norm.register_forward_hook(lambda m, i, o: final_in.__setitem__("x", i[0].detach()))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 30
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    print(f"# norm_type={config.norm_type} lr={args.lr} overrides={overrides}")
    for step in range(args.steps):
        batch = seqs[(step * 16) % len(seqs) : (step * 16) % len(seqs) + 16]
        length = max(map(len, batch))
        ids = torch.full((len(batch), length), tok.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        for j, seq in enumerate(batch):
            ids[j, : len(seq)] = torch.tensor(seq)
            labels[j, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % args.every == 0 or step == args.steps - 1:
            x = final_in["x"].float()
            alpha = model.model.norm.alpha.item() if hasattr(model.model.norm, "alpha") else 1.0
            saturated = (torch.tanh(alpha * x).abs() > 0.99).float().mean()
            print(
                f"step {step:4d}  loss {loss.item():.3f}  final-norm input std {x.std():7.2f}  "
                f"saturated {saturated:.2f}"
            )


if __name__ == "__main__":
    main()
