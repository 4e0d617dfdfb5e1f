"""Packed documents (issue 17): training throughput of padded vs packed vs concatenated batches, and the validation loss
of a short causal-LM run trained with document boundaries vs plain concatenation.

1. Throughput, in REAL (non-pad) tokens/s of a training step (forward with labels, backward, AdamW), for RetNet, GLA
   (`gate="key"`, short conv), Mamba-style and DyT (SDPA) causal LMs (`hf_extras.bench.family_causal_lm`, tiny width),
   on the MultiEmo sentences (`../shared/data/multiemo_en_sentences.jsonl`) tokenised with the byte tokenizer, each
   followed by eos. The documents, in file order, make one stream; step i covers the same stream slice in all three
   batchings:
     * `padded`:  the documents starting in that slice, one per row, right-padded to the longest (attention_mask,
                  labels -100 at pads);
     * `packed`:  the slice cut into rows of `--block` tokens, `position_ids` restarting at 0 at each document's first
                  token (DataCollatorWithFlattening's convention; a document crossing a row end keeps counting), labels
                  -100 at each document's first token;
     * `concat`:  the same rows without position_ids (documents read into each other: the recipe's behaviour before
                  issue 17).
   One model copy (same initial weights) and optimizer per batching; the three take turns step by step (rotating
   order), so machine load hits them alike. tokens/s = median over the timed steps of real tokens / step time.
2. Validation loss: the same small causal LM trained for `--loss-steps` steps on blocks cut from the stream of the
   training documents (shuffled by the seed, same order for both), with boundaries (`documents`) or without (`concat`), then
   evaluated on the same held-out documents, both as separate documents (boundaries: what a single document gets at
   inference, the fair comparison) and concatenated (the context a concat-trained model saw in training). Eval targets
   are the same in both evaluations (each document's first token is not a target). Corpora: the stdlib corpus
   (`hf_extras.data.load_default_corpus`: long files, few boundaries per block) and the MultiEmo sentences (many).
   One pair of runs per `--seeds` entry (initial weights and document order), since a few hundred steps of a tiny
   model move by a few hundredths of a nat with the seed alone.

    python benchmarks/packing.py                 # both parts, writes benchmarks/results/cpu/packing.json
    python benchmarks/packing.py --quick         # smoke run (seconds), writes nothing unless --out is given
    python benchmarks/packing.py --profile       # also prints where each batching's step time goes
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hf_extras.bench import count_parameters, environment_info, family_causal_lm, median
from hf_extras.data import build_byte_tokenizer, load_default_corpus
from hf_extras.data.corpus import stable_fraction

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ROOT.parent / "shared" / "data" / "multiemo_en_sentences.jsonl"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu" / "packing.json"

FAMILIES = {"retnet": "RetNet", "gla": "GLA", "mamba": "Mamba-style", "dyt": "DyT (SDPA)"}
BATCHINGS = ("padded", "packed", "concat")
PAD = -100  # ignored label

Batch = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------------------- data


def byte_tokenizer():
    """The recipes' tokenizer for plain text (no cls/sep), as `hf_extras.data.tokenizer_for_task(..., "causal_lm")`."""
    return build_byte_tokenizer(cls_sep=False)


def encode(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Token ids of each text, followed by eos (how the causal-LM recipe separates documents)."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray([*doc, tokenizer.eos_token_id], dtype=np.int64) for doc in ids]


def load_sentences(path: Path) -> list[str]:
    """The `text` field of every line of a jsonl file, in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --sentences with the MultiEmo jsonl (field 'text')")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def first_texts(texts: list[str], n_chars: int) -> list[str]:
    """The leading texts that hold at least `n_chars` characters (all of them if fewer): only those are tokenised
    (a character is one or more byte tokens)."""
    total = np.cumsum([len(t) for t in texts])
    return texts[: int(np.searchsorted(total, n_chars)) + 1]


def stream_of(documents: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The documents end to end, and each token's position within its document (0 at every document start)."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    stream = np.concatenate(documents)
    positions = np.arange(len(stream), dtype=np.int64) - np.repeat(starts, lengths)
    return stream, positions


def blocks(stream: np.ndarray, positions: np.ndarray, block: int, first: int, n: int) -> tuple[Tensor, Tensor]:
    """Blocks `first .. first + n - 1` of `block` tokens of the stream: ids and in-document positions, `(n, block)`."""
    cut = slice(first * block, (first + n) * block)
    return tuple(torch.from_numpy(a[cut].reshape(n, block).copy()) for a in (stream, positions))


def lm_batch(ids: Tensor, pos: Tensor, packing: str) -> Batch:
    """`documents` (packed with boundaries): position_ids, labels -100 at each document's first token; `concat`: the
    ids alone, every token a target (the causal-LM recipe before issue 17)."""
    if packing == "documents":
        return {"input_ids": ids, "position_ids": pos, "labels": ids.masked_fill(pos == 0, PAD)}
    return {"input_ids": ids, "labels": ids.clone()}


def padded_batch(documents: list[np.ndarray], pad_id: int) -> Batch:
    """One document per row, right-padded to the longest; labels -100 at pads."""
    longest = max(len(d) for d in documents)
    ids = torch.full((len(documents), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(documents):
        ids[row, : len(doc)] = torch.from_numpy(doc)
        mask[row, : len(doc)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, PAD)}


def throughput_batches(documents: list[np.ndarray], rows: int, block: int, steps: int, pad_id: int) -> dict:
    """`steps` batches per batching; step i of every batching holds (about) the same documents: the packed/concat
    rows are stream slice i, the padded batch the documents that start in it."""
    stream, positions = stream_of(documents)
    per_step = rows * block
    if len(stream) < steps * per_step:
        raise ValueError(
            f"{len(stream)} tokens are fewer than {steps} steps x {per_step}: pass fewer steps or a smaller --block/--rows"
        )
    lengths = np.array([len(d) for d in documents])
    starts = np.cumsum(lengths) - lengths
    batches: dict[str, list[Batch]] = {name: [] for name in BATCHINGS}
    for step in range(steps):
        ids, pos = blocks(stream, positions, block, step * rows, rows)
        batches["packed"].append(lm_batch(ids, pos, "documents"))
        batches["concat"].append(lm_batch(ids, pos, "concat"))
        in_step = np.flatnonzero((starts >= step * per_step) & (starts < (step + 1) * per_step))
        batches["padded"].append(padded_batch([documents[j] for j in in_step], pad_id))
    return batches


def real_tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


# ----------------------------------------------------------------------------------------------------------- part 1


def build(family: str, dims: dict, seed: int = 0) -> torch.nn.Module:
    return family_causal_lm(family, seed=seed, **dims)


class Trainer:
    """One model and its AdamW: `step(batch)` runs forward + backward + optimizer step and returns its seconds."""

    def __init__(self, model: torch.nn.Module, lr: float, schedule: Callable[[int], float] | None = None):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule) if schedule else None

    def step(self, batch: Batch) -> tuple[float, Tensor]:
        start = time.perf_counter()
        loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return time.perf_counter() - start, loss.detach()


def measure_throughput(family: str, batches: dict, dims: dict, warmup: int, steps: int) -> dict:
    """Round-robin over the batchings, step by step; real tokens/s = median of real tokens / step seconds."""
    base = build(family, dims)
    trainers = {name: Trainer(copy.deepcopy(base), lr=1e-4) for name in BATCHINGS}
    rates: dict[str, list[float]] = {name: [] for name in BATCHINGS}
    seconds: dict[str, list[float]] = {name: [] for name in BATCHINGS}
    for i in range(warmup + steps):
        order = BATCHINGS[i % 3 :] + BATCHINGS[: i % 3]
        for name in order:
            batch = batches[name][i]
            elapsed, _ = trainers[name].step(batch)
            if i >= warmup:
                rates[name].append(real_tokens(batch) / elapsed)
                seconds[name].append(elapsed)
    timed = {name: batches[name][warmup : warmup + steps] for name in BATCHINGS}
    row = {"family": family, "params": count_parameters(base)["params"]}
    for name in BATCHINGS:
        computed = sum(b["input_ids"].numel() for b in timed[name])
        real = sum(real_tokens(b) for b in timed[name])
        row[name] = {
            "tokens_per_s": median(rates[name]),
            "step_s_median": median(seconds[name]),
            "tokens_per_s_all": rates[name],
            "real_tokens_per_step": real / steps,
            "computed_tokens_per_step": computed / steps,
            "pad_fraction": 1 - real / computed,
        }
    row["packed_over_concat"] = row["packed"]["tokens_per_s"] / row["concat"]["tokens_per_s"]
    row["packed_over_padded"] = row["packed"]["tokens_per_s"] / row["padded"]["tokens_per_s"]
    return row


def profile_steps(family: str, batches: dict, dims: dict, steps: int) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds per step of every operator, averaged over `steps` profiled training steps (after two
    warm-up steps), per batching."""
    from torch.profiler import ProfilerActivity, profile

    base = build(family, dims)
    result = {}
    for name in BATCHINGS:
        trainer = Trainer(copy.deepcopy(base), lr=1e-4)
        for batch in batches[name][:2]:
            trainer.step(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[name][2 : 2 + steps]:
                trainer.step(batch)
        result[name] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    return result


def profile_report(family: str, ops: dict[str, dict[str, float]], top: int) -> str:
    """The costliest operators of each batching, and the operators whose time grows most from concat to packed."""
    lines = []
    for name in BATCHINGS:
        total = sum(ops[name].values())
        lines.append(f"\n{family} / {name}: {total:.1f} ms self CPU per step; top operators")
        for op, ms in sorted(ops[name].items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {ms:9.2f} ms  {op}")
    delta = {
        op: ops["packed"].get(op, 0.0) - ops["concat"].get(op, 0.0)
        for op in ops["packed"].keys() | ops["concat"].keys()
    }
    total = sum(ops["packed"].values()) - sum(ops["concat"].values())
    lines.append(f"\n{family}: packed - concat = {total:+.1f} ms per step; largest differences")
    for op, ms in sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:top]:
        lines.append(f"  {ms:+9.2f} ms  {op}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- part 2


def lm_rows(documents: list[np.ndarray], block: int, n_rows: int) -> tuple[Tensor, Tensor]:
    """The first `n_rows` blocks of the documents' stream (fewer if it is shorter): ids and positions."""
    stream, positions = stream_of(documents)
    n = min(n_rows, len(stream) // block)
    if n < 1:
        raise ValueError(f"the documents hold {len(stream)} tokens, fewer than one block of {block}")
    return blocks(stream, positions, block, 0, n)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: Tensor, pos: Tensor, boundaries: bool, batch_size: int) -> float:
    """Mean next-token loss over the held-out rows; targets are every token except each document's first, in both
    modes, so only the context differs (with boundaries: each document alone)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        x, p = ids[i : i + batch_size], pos[i : i + batch_size]
        logits = model(input_ids=x, position_ids=p if boundaries else None, use_cache=False).logits
        targets = x.masked_fill(p == 0, PAD)[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=PAD, reduction="sum"
        )
        total += float(loss)
        count += int((targets != PAD).sum())
    model.train()
    return total / count


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


EVALS = ("separate", "concatenated")


def train_and_evaluate(family: str, packing: str, ids, pos, eval_ids, eval_pos, dims: dict, seed: int, args) -> dict:
    """One model (weights from `seed`) trained on the blocks `ids` in order with `packing`, evaluated on the held-out
    rows with boundaries (`separate`) and without (`concatenated`)."""
    trainer = Trainer(
        build(family, dims, seed=seed), lr=args.lr, schedule=linear_schedule(args.loss_steps, args.loss_steps // 10)
    )
    start = time.perf_counter()
    for step in range(args.loss_steps):
        rows = slice(step * args.loss_batch, (step + 1) * args.loss_batch)
        trainer.step(lm_batch(ids[rows], pos[rows], packing))
    out = {"train_s": time.perf_counter() - start}
    for mode in EVALS:
        out[mode] = evaluate(trainer.model, eval_ids, eval_pos, mode == "separate", args.loss_batch * 2)
    return out


def loss_run(family: str, corpus: str, train_texts: list[str], eval_docs, tokenizer, dims: dict, args) -> dict:
    """For each seed (initial weights and the order of the training documents): one model per packing from the same
    weights on the same blocks, both evaluated on the same held-out rows with and without boundaries."""
    eval_ids, eval_pos = lm_rows(eval_docs, args.loss_block, args.eval_rows)
    n_rows = args.loss_steps * args.loss_batch
    row = {"family": family, "corpus": corpus, "eval_tokens": eval_ids.numel(),
           "eval_boundaries_per_block": float((eval_pos[:, 1:] == 0).sum()) / len(eval_ids), "seeds": []}  # fmt: skip
    for seed in args.seeds:
        texts = list(train_texts)
        random.Random(seed).shuffle(texts)
        ids, pos = lm_rows(encode(first_texts(texts, n_rows * args.loss_block), tokenizer), args.loss_block, n_rows)
        if len(ids) < n_rows:
            raise ValueError(f"{corpus}: only {len(ids)} training blocks for {args.loss_steps} x {args.loss_batch}")
        run = {"seed": seed, "train_boundaries_per_block": float((pos[:, 1:] == 0).sum()) / len(ids)}
        for packing in ("documents", "concat"):
            run[packing] = train_and_evaluate(family, packing, ids, pos, eval_ids, eval_pos, dims, seed, args)
            print(f"  {family} {corpus} seed {seed} {packing}: trained in {run[packing]['train_s']:.0f} s, eval loss "
                  + " / ".join(f"{mode} {run[packing][mode]:.4f}" for mode in EVALS), flush=True)  # fmt: skip
        row["seeds"].append(run)
    row["train_boundaries_per_block"] = float(np.mean([run["train_boundaries_per_block"] for run in row["seeds"]]))
    for packing in ("documents", "concat"):
        for mode in EVALS:
            row[f"{packing}_eval_{mode}"] = float(np.mean([run[packing][mode] for run in row["seeds"]]))
    return row


def loss_texts(names: list[str], sentences: Path = SENTENCES) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (training texts, held-out texts). stdlib: the corpus' own split (a stable hash of the path); multiemo:
    a stable hash of the text puts 2% in validation. Held-out texts keep the corpus order."""
    out = {}
    for name in names:
        if name == "stdlib":
            ds = load_default_corpus(validation_fraction=0.02)
            out[name] = (list(ds["train"]["text"]), list(ds["validation"]["text"]))
        else:
            texts = load_sentences(sentences)
            out[name] = (
                [t for t in texts if stable_fraction(t) >= 0.02],
                [t for t in texts if stable_fraction(t) < 0.02],
            )
    return out


# ----------------------------------------------------------------------------------------------------------- report


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def format_tables(result: dict) -> str:
    parts = []
    rows = result.get("throughput", [])
    if rows:
        header = ["real tokens/s", "padded", "packed", "concat", "packed / concat", "packed / padded"]
        body = [
            [FAMILIES[r["family"]]]
            + [f"{r[name]['tokens_per_s']:,.0f}" for name in BATCHINGS]
            + [f"{r['packed_over_concat']:.2f}x", f"{r['packed_over_padded']:.2f}x"]
            for r in rows
        ]
        pad = rows[0]["padded"]
        parts.append(
            _table(header, body)
            + f"\n\nPadded batches: {pad['real_tokens_per_step']:.0f} real of {pad['computed_tokens_per_step']:.0f} "
            f"computed tokens per step ({pad['pad_fraction']:.0%} padding); packed/concat: "
            f"{rows[0]['packed']['real_tokens_per_step']:.0f} tokens per step."
        )
    rows = result.get("loss", [])
    if rows:
        header = ["validation loss", "corpus", "boundaries / block", "trained packed, eval separate",
                  "trained concat, eval separate", "packed - concat (per seed)", "trained packed, eval concatenated",
                  "trained concat, eval concatenated"]  # fmt: skip
        body = []
        for r in rows:
            per_seed = ", ".join(
                f"{run['documents']['separate'] - run['concat']['separate']:+.3f}" for run in r["seeds"]
            )
            body.append(
                [FAMILIES[r["family"]], r["corpus"], f"{r['train_boundaries_per_block']:.2f}"]
                + [f"{r['documents_eval_separate']:.3f}", f"{r['concat_eval_separate']:.3f}", per_seed]
                + [f"{r['documents_eval_concatenated']:.3f}", f"{r['concat_eval_concatenated']:.3f}"]
            )
        seeds = len(rows[0]["seeds"])
        parts.append(
            _table(header, body) + f"\n\nLosses: mean over {seeds} seed(s) (initial weights and document order)."
        )
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of every model")
    parser.add_argument("--layers", type=int, default=2, help="number of blocks")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--sentences", type=Path, default=SENTENCES, help="MultiEmo jsonl (field 'text')")
    parser.add_argument("--block", type=int, default=512, help="packed row length (tokens)")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step (block x rows real tokens per step)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per batching")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per batching")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step per batching")
    parser.add_argument("--profile-top", type=int, default=12, help="operators listed per profile")
    parser.add_argument("--profile-steps", type=int, default=4, help="profiled steps per batching (averaged)")
    parser.add_argument("--loss-families", nargs="*", default=["gla", "dyt"], choices=list(FAMILIES),
                        help="families of the validation-loss comparison (none: skip it)")  # fmt: skip
    parser.add_argument("--loss-corpora", nargs="+", default=["stdlib", "multiemo"], choices=["stdlib", "multiemo"])
    parser.add_argument("--loss-steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--loss-block", type=int, default=256)
    parser.add_argument("--loss-batch", type=int, default=4, help="rows per training step")
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows (blocks) evaluated")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (10%% warm-up, linear decay)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="loss comparison: one pair of runs per seed (initial weights, document order)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few steps")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)}; none with --quick)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.block, args.rows, args.warmup, args.steps = 32, 1, 128, 2, 1, 2
        args.profile_steps = 1
        args.loss_steps, args.loss_block, args.loss_batch, args.eval_rows = 3, 64, 2, 4
        args.loss_corpora, args.seeds = ["multiemo"], [0]
    elif args.out is None:
        args.out = DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dims = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads)
    tokenizer = byte_tokenizer()
    result: dict = {"meta": environment_info(args.threads) | {"args": {k: str(v) for k, v in vars(args).items()}}}
    start = time.perf_counter()

    n_steps = max(args.warmup + args.steps, 2 + args.profile_steps if args.profile else 0)
    texts = first_texts(load_sentences(args.sentences), n_steps * args.rows * args.block)
    batches = throughput_batches(encode(texts, tokenizer), args.rows, args.block, n_steps, tokenizer.pad_token_id)
    result["throughput"] = []
    for family in args.families:
        row = measure_throughput(family, batches, dims, args.warmup, args.steps)
        result["throughput"].append(row)
        print(
            f"{family}: " + ", ".join(f"{n} {row[n]['tokens_per_s']:,.0f}" for n in BATCHINGS) + " real tokens/s",
            flush=True,
        )
    if args.profile:
        result["profile"] = {}
        for family in args.families:
            ops = profile_steps(family, batches, dims, args.profile_steps)
            result["profile"][family] = ops
            print(profile_report(family, ops, args.profile_top), flush=True)
    result["throughput_s"] = time.perf_counter() - start

    if args.loss_families:
        result["loss"] = []
        for corpus, (train, held) in loss_texts(args.loss_corpora, args.sentences).items():
            eval_docs = encode(first_texts(held, args.eval_rows * args.loss_block), tokenizer)
            for family in args.loss_families:
                result["loss"].append(loss_run(family, corpus, train, eval_docs, tokenizer, dims, args))
    result["total_s"] = time.perf_counter() - start
    print()
    print(format_tables(result))
    print(
        f"\n{result['total_s']:.0f} s in all, {args.threads} thread(s), load average {result['meta'].get('load_average')}"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
