"""Timing one model: training tokens/s (`TrainStep`, `train_throughput`) and decode ms/token (`Decoder`,
`decode_latency`), medians over timed steps after untimed warm-up steps. Plain functions, usable on their own.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence

import torch

__all__ = [
    "Decoder",
    "TrainStep",
    "available_cores",
    "cache_bytes",
    "decode_latency",
    "median",
    "model_device",
    "random_ids",
    "train_throughput",
]


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def random_ids(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0  # skip the special ids (pad/eos/bos)
    return torch.randint(low, vocab_size, (batch_size, seq_len), generator=generator)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class TrainStep:
    """One model, one AdamW optimizer, one fixed random batch: `step()` returns its wall time in seconds."""

    def __init__(self, model, seq_len: int, batch_size: int, seed: int = 0, lr: float = 1e-4):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        vocab_size = model.get_input_embeddings().num_embeddings
        self.ids = random_ids(batch_size, seq_len, vocab_size, seed).to(model_device(model))

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _train_times(model, seq_len: int, batch_size: int, steps: int, warmup: int, seed: int = 0) -> list[float]:
    trainer = TrainStep(model, seq_len, batch_size, seed)
    for _ in range(warmup):
        trainer.step()
    return [trainer.step() for _ in range(steps)]


def train_throughput(model, seq_len: int, batch_size: int, steps: int = 3, warmup: int = 1, *, seed: int = 0) -> float:
    """Training tokens per second: `batch_size * seq_len` over the median time of one full step.

    A step is a forward pass with `labels=input_ids` (causal LM loss), backward and `AdamW.step()` on a fixed batch
    of random token ids. `warmup` untimed steps come first (the first one also allocates AdamW's state). The model is
    trained in place (its weights change) and left in train mode.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    times = _train_times(model, seq_len, batch_size, steps, warmup, seed)
    return batch_size * seq_len / median(times)


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _tensors(value, depth: int = 0):
    """Every tensor held by `value` (an object's attributes, lists, tuples, dicts), a few levels deep."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3:
        if isinstance(value, dict):
            items = value.values()
        elif isinstance(value, (list, tuple)):
            items = value
        else:
            items = vars(value).values() if hasattr(value, "__dict__") else ()
        for item in items:
            yield from _tensors(item, depth + 1)


def cache_bytes(cache) -> int:
    """Bytes of tensor storage a generation cache holds: keys/values of transformers' `DynamicCache` layers,
    recurrent and conv states of `RecurrentCache` layers, both for a hybrid. Shared storages count once."""
    storages = {}
    for layer in getattr(cache, "layers", None) or [cache]:
        for tensor in _tensors(layer):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class Decoder:
    """One model's greedy decoding, one token per `step()`: prefill `context_len` random tokens first (untimed).

    `times` collects the wall time of the timed steps (seconds); the context grows by one token per step.
    `cache_bytes`: the cache's size right after the prefill (`cache_bytes(cache)`).
    """

    def __init__(self, model, context_len: int, seed: int = 0):
        self.model = model.eval()
        vocab_size = model.get_input_embeddings().num_embeddings
        ids = random_ids(1, context_len, vocab_size, seed).to(model_device(model))
        with torch.no_grad():
            start = time.perf_counter()
            self.out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self.prefill_s = time.perf_counter() - start
        self.cache = _cache_of(self.out)
        if self.cache is None:
            raise RuntimeError(f"{type(model).__name__} returned no cache from a `use_cache=True` forward pass.")
        self.cache_bytes = cache_bytes(self.cache)
        self.times: list[float] = []

    def step(self, timed: bool = True) -> None:
        with torch.no_grad():
            start = time.perf_counter()
            next_ids = self.out.logits[:, -1:].argmax(-1)  # greedy: (1, 1)
            self.out = self.model(input_ids=next_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
            self.cache = _cache_of(self.out)
            elapsed = time.perf_counter() - start
        if timed:
            self.times.append(elapsed)


def decode_latency(model, context_len: int, new_tokens: int = 32, warmup: int = 4, *, seed: int = 0) -> float:
    """Milliseconds per generated token (median), batch 1, greedy, after a prefill of `context_len` tokens.

    The prefill is one forward pass (chunkwise/parallel form for hf_extras, SDPA for Llama) and is not timed; then each
    step feeds the argmax token with the model's cache (`RecurrentCache` / `DynamicCache`) under `torch.no_grad`.
    The first `warmup` steps are not timed; the context grows by one token per step.
    """
    if new_tokens < 1:
        raise ValueError(f"`new_tokens` must be >= 1, got {new_tokens}.")
    decoder = Decoder(model, context_len, seed)
    for index in range(warmup + new_tokens):
        decoder.step(timed=index >= warmup)
    return 1000.0 * median(decoder.times)
