"""The suite: every model of a list, training and decoding at several lengths, round-robin, one row per measurement.

`run_suite` returns rows (dicts with `TRAIN_KEYS` / `DECODE_KEYS`); `environment_info` records where and with what
they were measured.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .isolation import model_recipe, run_isolated, train_worker
from .models import DEFAULT_FAMILIES, MODELS, Dims, ModelSpec, count_parameters
from .timing import Decoder, TrainStep, available_cores, median

__all__ = ["DECODE_KEYS", "TRAIN_KEYS", "environment_info", "run_suite"]


TRAIN_KEYS = (
    "kind",
    "model",
    "label",
    "params",
    "params_non_embedding",
    "seq_len",
    "batch_size",
    "tokens_per_step",
    "tokens_per_s",
    "step_s",
    "step_s_all",
    "peak_mem_mb",
    "error",
)
DECODE_KEYS = (
    "kind",
    "model",
    "label",
    "params",
    "params_non_embedding",
    "context_len",
    "new_tokens",
    "ms_per_token",
    "ms_per_token_all",
    "prefill_s",
    "cache_bytes",
    "error",
)


def _row(kind: str, spec: ModelSpec, params: dict[str, int], **values) -> dict[str, Any]:
    keys = TRAIN_KEYS if kind == "train" else DECODE_KEYS
    row = dict.fromkeys(keys)
    row.update(kind=kind, model=spec.name, label=spec.label, **params)
    row.update(values)
    return row


def _skipped(limit: int | None, length: int) -> str | None:
    return (
        f"skipped: longer than this model's benchmark limit ({limit})" if limit is not None and length > limit else None
    )


def run_suite(
    seq_lens: Iterable[int] = (512, 2048, 8192),
    contexts: Iterable[int] = (256, 8192),
    families: Iterable[str] = DEFAULT_FAMILIES,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 264,
    tokens_per_step: int = 8192,
    train_steps: int = 3,
    train_warmup: int = 1,
    new_tokens: int = 128,  # 32 gave medians that moved by ~25% between runs (a ~7 ms step, ms-scale jitter)
    decode_warmup: int = 4,
    isolate: bool = True,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every model in `families` and return one row per (model, measurement, length).

    Timing is round-robin: for each length, every model is built, warmed up, and then the models take turns, one
    step each per round, so background load and CPU frequency changes hit all of them alike and the *ratios* stay
    meaningful on a shared machine (absolute numbers still drift with the load).

    Training rows (`kind="train"`, keys `TRAIN_KEYS`): for each `seq_len`, batch size `max(1, tokens_per_step //
    seq_len)` so every step sees about the same number of tokens; `tokens_per_s` from the median of `train_steps`
    timed steps after `train_warmup`; with `isolate=True` (default), `peak_mem_mb` is the peak-RSS increase of one
    step in a fresh child process (see `hf_extras.bench.isolation`), else `None`.

    Decode rows (`kind="decode"`, keys `DECODE_KEYS`): for each context length, median ms per greedy token over
    `new_tokens` steps after `decode_warmup`, batch 1, models taking turns token by token; `cache_bytes` is the size
    of the model's cache after the prefill of the context (batch 1).

    A configuration that fails (e.g. out of memory) or that a model's `max_train_len` / `max_decode_context` skips
    gives a row with `error` set and `None` values; the suite goes on.

    `isolate=True` starts children through a `multiprocessing` fork server (spawn where there is none), which, like any
    spawn-style multiprocessing, re-imports the calling script in each child: call it from a script guarded by
    `if __name__ == "__main__":`, from pytest or from a notebook (not from code piped into `python -`).
    """
    families = list(families)
    unknown = [name for name in families if name not in MODELS]
    if unknown:
        raise ValueError(f"Unknown model(s) {unknown}; known: {sorted(MODELS)} (add one with `register_model`).")
    seq_lens, contexts = sorted(set(seq_lens)), sorted(set(contexts))
    threads = threads or available_cores()
    torch.set_num_threads(threads)
    say = progress or (lambda message: None)
    longest = max([*seq_lens, *(c + decode_warmup + new_tokens for c in contexts), 1])
    dims = Dims(hidden, layers, heads, intermediate, vocab, max_positions=longest)
    specs = [MODELS[name] for name in families]
    suite_start = time.perf_counter()

    params = {}
    for spec in specs:
        with torch.device("meta"):
            params[spec.name] = count_parameters(spec.build(dims))
        say(
            f"{spec.label}: {params[spec.name]['params']:,} parameters "
            f"({params[spec.name]['params_non_embedding']:,} non-embedding)"
        )

    rows: list[dict[str, Any]] = []
    for seq_len in seq_lens:
        batch_size = max(1, tokens_per_step // seq_len)
        shape = dict(seq_len=seq_len, batch_size=batch_size, tokens_per_step=batch_size * seq_len)
        start = time.perf_counter()
        results: dict[str, dict[str, Any]] = {}
        trainers: dict[str, TrainStep] = {}
        for spec in specs:
            skipped = _skipped(spec.max_train_len, seq_len)
            if skipped:
                results[spec.name] = {"error": skipped}
                continue
            try:
                peak = None
                if isolate:  # memory first, in a fresh process, so nothing measured here masks it
                    with torch.device("meta"):
                        recipe = model_recipe(spec.build(dims))
                    peak = run_isolated(train_worker, *recipe, seq_len, batch_size, 0, 0, seed, threads)["peak_mem_mb"]
                torch.manual_seed(seed)
                trainers[spec.name] = TrainStep(spec.build(dims), seq_len, batch_size, seed)
                results[spec.name] = {"peak_mem_mb": peak, "step_s_all": []}
            except (RuntimeError, MemoryError) as exc:
                results[spec.name] = {"error": str(exc)}
        for round_index in range(train_warmup + train_steps):
            for name, trainer in list(trainers.items()):
                try:
                    elapsed = trainer.step()
                except (RuntimeError, MemoryError) as exc:
                    results[name] = {"error": str(exc)}
                    del trainers[name]
                    continue
                if round_index >= train_warmup:
                    results[name]["step_s_all"].append(elapsed)
        trainers.clear()
        for spec in specs:
            result = results[spec.name]
            if result.get("error"):
                rows.append(_row("train", spec, params[spec.name], **shape, error=result["error"]))
                say(f"  {spec.label:<22} train seq {seq_len:>6}: {result['error']}")
                continue
            step_s = median(result["step_s_all"])
            rows.append(
                _row(
                    "train",
                    spec,
                    params[spec.name],
                    **shape,
                    tokens_per_s=batch_size * seq_len / step_s,
                    step_s=step_s,
                    **result,
                )
            )
            mem = f", peak +{result['peak_mem_mb']:.0f} MB" if result["peak_mem_mb"] is not None else ""
            say(
                f"  {spec.label:<22} train seq {seq_len:>6} x batch {batch_size:<3}: "
                f"{batch_size * seq_len / step_s:>9,.0f} tokens/s ({step_s:.3f} s/step{mem})"
            )
        say(f"  [train {seq_len}: {time.perf_counter() - start:.0f} s]")

    models = {}
    for spec in specs:
        torch.manual_seed(seed)
        models[spec.name] = spec.build(dims)
    for context_len in contexts:
        start = time.perf_counter()
        runs: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for spec in specs:
            skipped = _skipped(spec.max_decode_context, context_len)
            if skipped:
                errors[spec.name] = skipped
                continue
            try:
                runs[spec.name] = Decoder(models[spec.name], context_len, seed)
            except (RuntimeError, MemoryError) as exc:
                errors[spec.name] = str(exc)
        for index in range(decode_warmup + new_tokens):
            for name, decoder in list(runs.items()):
                try:
                    decoder.step(timed=index >= decode_warmup)
                except (RuntimeError, MemoryError) as exc:
                    errors[name] = str(exc)
                    del runs[name]
        for spec in specs:
            if spec.name in errors:
                rows.append(
                    _row(
                        "decode",
                        spec,
                        params[spec.name],
                        context_len=context_len,
                        new_tokens=new_tokens,
                        error=errors[spec.name],
                    )
                )
                say(f"  {spec.label:<22} decode ctx {context_len:>6}: {errors[spec.name]}")
                continue
            decoder = runs[spec.name]
            ms = 1000.0 * median(decoder.times)
            rows.append(
                _row(
                    "decode",
                    spec,
                    params[spec.name],
                    context_len=context_len,
                    new_tokens=new_tokens,
                    ms_per_token=ms,
                    ms_per_token_all=[1000.0 * t for t in decoder.times],
                    prefill_s=decoder.prefill_s,
                    cache_bytes=decoder.cache_bytes,
                )
            )
            say(
                f"  {spec.label:<22} decode ctx {context_len:>6}: {ms:8.2f} ms/token (prefill {decoder.prefill_s:.2f} s, "
                f"cache {decoder.cache_bytes / 2**20:.2f} MiB)"
            )
        say(f"  [decode {context_len}: {time.perf_counter() - start:.0f} s]")
    say(f"suite done in {time.perf_counter() - suite_start:.0f} s")
    return rows


def environment_info(threads: int | None = None) -> dict[str, Any]:
    """Where and with what the numbers were measured (saved next to them)."""
    import transformers

    info = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "available_cores": available_cores(),
        "torch_threads": threads or torch.get_num_threads(),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except (AttributeError, OSError):
        pass
    try:
        import hf_extras

        info["hf_extras"] = hf_extras.__version__
    except ImportError:
        pass
    return info
