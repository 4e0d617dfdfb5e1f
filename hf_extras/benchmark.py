"""Speed benchmark: hf_extras families side by side with transformers' Llama, measured in one run on one machine.

Three measurements, each a plain function usable on its own:

* `train_throughput(model, seq_len, batch_size, steps, warmup)` -- tokens/s of a full training step (forward with
  `labels=input_ids`, backward, `AdamW.step`) on random token ids; median over `steps` timed steps after `warmup`.
* `decode_latency(model, context_len, new_tokens, warmup)` -- ms per generated token, batch 1, greedy, through the
  model's own cache (`RecurrentCache` for hf_extras, `DynamicCache` for Llama) after a prefill of `context_len`
  tokens. Only the one-token decode steps are timed (median), never the prefill.
* `peak_memory_train_step(model, seq_len, batch_size)` -- how much one training step raises the process's peak
  resident set size (RSS), in MB. See "Memory method" below.

`run_suite(...)` runs them for a list of models (`MODELS`, name -> `ModelSpec` whose `build(dims)` makes a causal LM
of a given width and depth; add a family with `register_model`) and returns result rows (dicts); `format_tables`
turns rows into markdown tables with ratios against the baseline (Llama), `save_plots` writes PNGs, `write_report`
writes everything into a folder. `main(argv)` is `hf-extras bench` (and `benchmarks/run_cpu.py`).

Memory method: PyTorch's CPU allocator is invisible to `tracemalloc`, and a process's peak RSS never goes down, so an
earlier, larger run would mask a later one. Each training configuration therefore runs in a fresh child process
forked from a `multiprocessing` fork server that has only imported the libraries (it never ran a model, so it holds
no freed-but-cached tensor memory). The child builds the model and the optimizer, reads its peak RSS
(`VmHWM`, see `process_memory_mb`), runs one training step, and reports the increase. That increase covers
activations kept for backward, gradients, AdamW's two state tensors per parameter (allocated lazily in the first
step), and temporary buffers; it excludes the weights themselves and the interpreter. It is an RSS figure, so it also
counts allocator slack and any memory the allocator keeps after freeing. The timed steps of that configuration run in
the same child afterwards, so the training numbers of one configuration never depend on what ran before it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Dims",
    "ModelSpec",
    "MODELS",
    "DEFAULT_FAMILIES",
    "BASELINE",
    "TRAIN_KEYS",
    "DECODE_KEYS",
    "register_model",
    "available_cores",
    "count_parameters",
    "train_throughput",
    "decode_latency",
    "peak_memory_train_step",
    "process_memory_mb",
    "run_suite",
    "environment_info",
    "format_tables",
    "save_results",
    "save_plots",
    "write_report",
    "main",
]


# --------------------------------------------------------------------------------------------------------------------
# the models under test (data-driven: name -> factory)
# --------------------------------------------------------------------------------------------------------------------


def glu_intermediate_size(hidden_size: int) -> int:
    """hf_extras' default SwiGLU width: 8/3 x hidden, rounded up to a multiple of 8 (Llama-style)."""
    return 8 * ((8 * hidden_size // 3 + 7) // 8)


@dataclass(frozen=True)
class Dims:
    """Width and depth every model of one suite shares."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None  # None: glu_intermediate_size(hidden_size)
    vocab_size: int = 264
    max_positions: int = 8192  # Llama's max_position_embeddings; the suite sets it to the longest input

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else glu_intermediate_size(self.hidden_size)

    def hfx_kwargs(self) -> dict[str, Any]:
        """The shared hf_extras config fields."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_heads=self.num_heads,
            intermediate_size=self.ffn_size,
            ffn_type="glu",
        )


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: `build(dims)` returns a causal LM (a transformers `PreTrainedModel`).

    `max_train_len` / `max_decode_context`: longer runs are skipped and reported as such (for baselines whose CPU
    path would take hours, e.g. transformers' Mamba without its CUDA kernels).
    """

    name: str
    label: str
    build: Callable[[Dims], torch.nn.Module]
    description: str = ""
    max_train_len: int | None = None
    max_decode_context: int | None = None


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a model in `MODELS`; later families register themselves here."""
    MODELS[spec.name] = spec
    return spec


def _llama_config(dims: Dims, intermediate_size: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=intermediate_size or dims.ffn_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_heads,
        max_position_embeddings=dims.max_positions,
        tie_word_embeddings=True,  # as hf_extras' causal LMs, so parameter counts compare
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def _build_llama(dims: Dims):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(_llama_config(dims), attn_implementation="sdpa")


def llama_non_embedding_params(dims: Dims) -> int:
    """Non-embedding parameters of the baseline Llama of these dims (counted on the meta device: no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_llama_config(dims))
    return count_parameters(model)["params_non_embedding"]


def _matched_ffn_size(build_with: Callable[[int], torch.nn.Module], target: int, start: int) -> int:
    """The FFN width (a multiple of 8) whose model has the non-embedding parameter count nearest `target`.

    Parameters grow linearly in the FFN width, so two builds give the slope (on the meta device: no memory).
    """
    with torch.device("meta"):
        at_start = count_parameters(build_with(start))["params_non_embedding"]
        slope = (at_start - count_parameters(build_with(start - 8))["params_non_embedding"]) / 8
    if slope <= 0:
        return start
    return max(8, int(round((start + (target - at_start) / slope) / 8)) * 8)


def _build_hfx(
    config_name: str, model_name: str, match_llama: bool = True, **overrides
) -> Callable[[Dims], torch.nn.Module]:
    """Builder of an hf_extras causal LM of the suite's width, depth and heads.

    `match_llama`: set the FFN width so the model has as many non-embedding parameters as the baseline Llama (RetNet's
    value/gate projections are twice as wide as attention's, so at Llama's FFN width it would have ~1.3x the
    parameters and the compute; the RetNet paper compares at equal parameters the same way).
    """

    def build(dims: Dims):
        import hf_extras

        config_class, model_class = getattr(hf_extras, config_name), getattr(hf_extras, model_name)

        def build_with(ffn: int):
            return model_class(config_class(**{**dims.hfx_kwargs(), "intermediate_size": ffn}, **overrides))

        ffn = dims.ffn_size
        if match_llama:
            ffn = _matched_ffn_size(build_with, llama_non_embedding_params(dims), ffn)
        return build_with(ffn)

    return build


def _build_transformers_mamba(dims: Dims):
    """transformers' MambaForCausalLM of the suite's width and depth (expand 2, state 16): its CPU path, no kernels."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        num_hidden_layers=dims.num_hidden_layers,
        state_size=16,
        expand=2,
        conv_kernel=4,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return MambaForCausalLM(config)


def _build_hfx_mamba(dims: Dims):
    """hf_extras' Mamba with transformers' Mamba config (same parameters, same layout)."""
    import hf_extras

    config = hf_extras.HfxMambaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        num_hidden_layers=dims.num_hidden_layers,
        state_size=16,
        expand=2,
        conv_kernel=4,
        forward_mode="auto",
    )
    return hf_extras.HfxMambaForCausalLM(config)


register_model(
    ModelSpec(
        "llama",
        "Llama",
        _build_llama,
        "transformers LlamaForCausalLM, SDPA attention, SwiGLU FFN 8/3 x width, tied embeddings (the baseline)",
    )
)
register_model(
    ModelSpec(
        "retnet",
        "RetNet",
        _build_hfx("RetNetConfig", "RetNetForCausalLM", forward_mode="auto"),
        "hf_extras RetNet, forward_mode='auto' (parallel up to 128 tokens, chunkwise above), FFN width matched to "
        "Llama's parameter count",
    )
)
register_model(
    ModelSpec(
        "gla",
        "GLA",
        _build_hfx("GatedRetentionConfig", "GatedRetentionForCausalLM", gate="key", forward_mode="auto"),
        "hf_extras gated retention, gate='key' (GLA: one decay per key channel), FFN matched to Llama's parameters",
    )
)
register_model(
    ModelSpec(
        "gated_retnet",
        "Gated RetNet",
        _build_hfx("GatedRetentionConfig", "GatedRetentionForCausalLM", gate="head", forward_mode="auto"),
        "hf_extras gated retention, gate='head' (one decay per head and token), FFN matched to Llama's parameters",
    )
)
register_model(
    ModelSpec(
        "gated_deltanet",
        "Gated DeltaNet",
        _build_hfx("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", gate="head", forward_mode="auto"),
        "hf_extras Gated DeltaNet (delta rule, per-head decay, short conv, gated output norm), FFN matched to "
        "Llama's parameters",
    )
)
register_model(
    ModelSpec(
        "dyt",
        "DyT",
        _build_hfx("DyTConfig", "DyTForCausalLM", attn_implementation="sdpa"),
        "hf_extras DyT transformer (Llama layout with DynamicTanh instead of RMSNorm, SDPA)",
    )
)
register_model(
    ModelSpec(
        "hfx_mamba",
        "Mamba (hf_extras)",
        _build_hfx_mamba,
        "hf_extras Mamba (no FFN, expand 2, state 16: about half of Llama's parameters at equal width and depth)",
    )
)
register_model(
    ModelSpec(
        "hf_mamba",
        "Mamba (transformers)",
        _build_transformers_mamba,
        "transformers MambaForCausalLM, same config as hf_extras' Mamba; on CPU its per-token Python loop (no kernels)",
        max_train_len=512,
        max_decode_context=8192,
    )
)

BASELINE = "llama"
DEFAULT_FAMILIES: tuple[str, ...] = (
    "llama",
    "retnet",
    "gla",
    "gated_retnet",
    "gated_deltanet",
    "dyt",
    "hfx_mamba",
    "hf_mamba",
)

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
    "error",
)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters (tied weights once) and the same without the token embedding / LM head."""
    total = sum(p.numel() for p in model.parameters())
    embedding = 0
    seen = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            embedding += weight.numel()
    return {"params": total, "params_non_embedding": total - embedding}


def _random_ids(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0  # skip the special ids (pad/eos/bos)
    return torch.randint(low, vocab_size, (batch_size, seq_len), generator=generator)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def process_memory_mb(kind: str = "peak") -> float:
    """This process's resident set size in MB: `"peak"` so far (Linux `VmHWM`) or `"current"` (`VmRSS`).

    `/proc/self/status` rather than `getrusage().ru_maxrss`: the latter survives `execve`, so a child started that way
    would report its parent's peak. Elsewhere (macOS) falls back to `ru_maxrss` (bytes there) for both kinds.
    """
    field = {"peak": "VmHWM:", "current": "VmRSS:"}[kind]
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


class _Trainer:
    """One model, one AdamW optimizer, one fixed random batch: `step()` returns its wall time in seconds."""

    def __init__(self, model, seq_len: int, batch_size: int, seed: int = 0, lr: float = 1e-4):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        vocab_size = model.get_input_embeddings().num_embeddings
        self.ids = _random_ids(batch_size, seq_len, vocab_size, seed).to(_model_device(model))

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _train_times(model, seq_len: int, batch_size: int, steps: int, warmup: int, seed: int = 0) -> list[float]:
    trainer = _Trainer(model, seq_len, batch_size, seed)
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
    return batch_size * seq_len / _median(times)


# --------------------------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------------------------


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class _Decoder:
    """One model's greedy decoding, one token per `step()`: prefill `context_len` random tokens first (untimed).

    `times` collects the wall time of the timed steps (seconds); the context grows by one token per step.
    """

    def __init__(self, model, context_len: int, seed: int = 0):
        self.model = model.eval()
        vocab_size = model.get_input_embeddings().num_embeddings
        ids = _random_ids(1, context_len, vocab_size, seed).to(_model_device(model))
        with torch.no_grad():
            start = time.perf_counter()
            self.out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self.prefill_s = time.perf_counter() - start
        self.cache = _cache_of(self.out)
        if self.cache is None:
            raise RuntimeError(f"{type(model).__name__} returned no cache from a `use_cache=True` forward pass.")
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
    decoder = _Decoder(model, context_len, seed)
    for index in range(warmup + new_tokens):
        decoder.step(timed=index >= warmup)
    return 1000.0 * _median(decoder.times)


# --------------------------------------------------------------------------------------------------------------------
# isolated child processes (memory, and the suite's training runs)
# --------------------------------------------------------------------------------------------------------------------

_PRELOAD = ["torch", "transformers", "hf_extras", "hf_extras.benchmark"]


def _mp_context():
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # the server imports these once and never runs a model
        return ctx
    return multiprocessing.get_context("spawn")


def _child_entry(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _run_isolated(fn, *args):
    """Run `fn(*args)` in a fresh child process; return its result or raise RuntimeError with the child's error."""
    ctx = _mp_context()
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_entry, args=(sender, fn, args), daemon=True)
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"benchmark child process died (exit code {process.exitcode}; -9 usually means out of memory)"
        ) from None
    finally:
        receiver.close()
    process.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def _train_worker(model_class, config, dtype, seq_len, batch_size, steps, warmup, seed, threads):
    """Child: build the model, measure the peak-RSS increase of its first training step, then time `steps` steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = model_class(config).to(dtype)
    trainer = _Trainer(model, seq_len, batch_size, seed)
    before = process_memory_mb("peak")
    first_step_s = trainer.step()
    peak_mem_mb = process_memory_mb("peak") - before
    for _ in range(max(warmup - 1, 0)):  # the memory step counts as the first warmup step
        trainer.step()
    times = [trainer.step() for _ in range(steps)]
    return {"peak_mem_mb": peak_mem_mb, "first_step_s": first_step_s, "step_s_all": times}


def _model_recipe(model):
    """What a child needs to rebuild an equivalent model: its class, its config, its dtype (weights are not sent)."""
    return type(model), model.config, next(model.parameters()).dtype


def peak_memory_train_step(model, seq_len: int, batch_size: int, *, seed: int = 0, threads: int | None = None) -> float:
    """MB by which one training step (forward, backward, AdamW step) raises peak RSS, measured in a fresh process.

    The child rebuilds the model from `type(model)(model.config)` (same architecture and dtype, fresh weights: memory
    does not depend on the values), creates AdamW and a random batch, and reports `ru_maxrss` after the step minus
    before it. See the module docstring for what the figure includes.
    """
    threads = threads or available_cores()
    result = _run_isolated(_train_worker, *_model_recipe(model), seq_len, batch_size, 0, 0, seed, threads)
    return result["peak_mem_mb"]


# --------------------------------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------------------------------


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
    step in a fresh child process (see the module docstring), else `None`.

    Decode rows (`kind="decode"`, keys `DECODE_KEYS`): for each context length, median ms per greedy token over
    `new_tokens` steps after `decode_warmup`, batch 1, models taking turns token by token.

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
        trainers: dict[str, _Trainer] = {}
        for spec in specs:
            skipped = _skipped(spec.max_train_len, seq_len)
            if skipped:
                results[spec.name] = {"error": skipped}
                continue
            try:
                peak = None
                if isolate:  # memory first, in a fresh process, so nothing measured here masks it
                    with torch.device("meta"):
                        recipe = _model_recipe(spec.build(dims))
                    peak = _run_isolated(_train_worker, *recipe, seq_len, batch_size, 0, 0, seed, threads)[
                        "peak_mem_mb"
                    ]
                torch.manual_seed(seed)
                trainers[spec.name] = _Trainer(spec.build(dims), seq_len, batch_size, seed)
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
            step_s = _median(result["step_s_all"])
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
                runs[spec.name] = _Decoder(models[spec.name], context_len, seed)
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
            ms = 1000.0 * _median(decoder.times)
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
                )
            )
            say(
                f"  {spec.label:<22} decode ctx {context_len:>6}: {ms:8.2f} ms/token (prefill {decoder.prefill_s:.2f} s)"
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


# --------------------------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------------------------


def _ok(row) -> bool:
    return row.get("error") is None


def _index(rows, kind: str, length_key: str, value_key: str):
    """{model: {length: value}} (None for failed runs), model order as first seen, and the sorted lengths."""
    table: dict[str, dict[int, float | None]] = {}
    labels: dict[str, str] = {}
    lengths = set()
    for row in rows:
        if row["kind"] != kind:
            continue
        labels.setdefault(row["model"], row.get("label") or row["model"])
        table.setdefault(row["model"], {})[row[length_key]] = row[value_key] if _ok(row) else None
        lengths.add(row[length_key])
    return table, labels, sorted(lengths)


def _fmt(value, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _length_name(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def format_tables(rows: list[dict[str, Any]], baseline: str = BASELINE) -> str:
    """Markdown: parameters, training tokens/s, peak memory and decode latency, each with ratios against `baseline`."""
    sections = []
    params = {}
    for row in rows:
        params.setdefault(
            row["model"], (row.get("label") or row["model"], row.get("params"), row.get("params_non_embedding"))
        )
    if params:
        sections.append(
            "### Parameters\n\n"
            + _md_table(
                ["model", "parameters", "non-embedding", f"/ {params.get(baseline, (baseline,))[0]}"],
                [
                    [label, _fmt(p), _fmt(ne), _fmt(_ratio(p, params.get(baseline, (None, None))[1]), 2, "x")]
                    for label, p, ne in params.values()
                ],
            )
        )

    tps, labels, seq_lens = _index(rows, "train", "seq_len", "tokens_per_s")
    if tps:
        base_label = labels.get(baseline, baseline)
        batches = {row["seq_len"]: row["batch_size"] for row in rows if row["kind"] == "train"}
        header = ["model"] + [f"{_length_name(n)} (x{batches[n]})" for n in seq_lens]
        sections.append(
            "### Training throughput (tokens/s; forward + backward + AdamW; seq_len (x batch))\n\n"
            + _md_table(header, [[labels[m]] + [_fmt(tps[m].get(n)) for n in seq_lens] for m in tps])
        )
        if baseline in tps:
            sections.append(
                f"### Training speed vs {base_label} (model tokens/s / {base_label} tokens/s; > 1 is faster)\n\n"
                + _md_table(
                    ["ratio"] + [_length_name(n) for n in seq_lens],
                    [
                        [f"{labels[m]} / {base_label} tokens/s"]
                        + [_fmt(_ratio(tps[m].get(n), tps[baseline].get(n)), 2, "x") for n in seq_lens]
                        for m in tps
                        if m != baseline
                    ],
                )
            )
        mem, _, _ = _index(rows, "train", "seq_len", "peak_mem_mb")
        if any(v is not None for per in mem.values() for v in per.values()):
            body = []
            for m in mem:
                cells = [labels[m]]
                for n in seq_lens:
                    ratio = _ratio(mem[m].get(n), mem.get(baseline, {}).get(n)) if m != baseline else None
                    cells.append(_fmt(mem[m].get(n)) + (f" ({_fmt(ratio, 2, 'x')})" if ratio is not None else ""))
                body.append(cells)
            sections.append(
                f"### Peak memory of one training step (MB of peak-RSS increase, fresh process; (model / {base_label}))\n\n"
                + _md_table(["model"] + [_length_name(n) for n in seq_lens], body)
            )

    ms, labels, contexts = _index(rows, "decode", "context_len", "ms_per_token")
    if ms:
        base_label = labels.get(baseline, baseline)
        header = ["model"] + [f"ctx {_length_name(c)}" for c in contexts]
        if len(contexts) > 1:
            header.append(f"ctx {_length_name(contexts[-1])} / ctx {_length_name(contexts[0])}")
        if baseline in ms:
            header += [f"{base_label} / model @ {_length_name(c)}" for c in contexts]
        body = []
        for m in ms:
            cells = [labels[m]] + [_fmt(ms[m].get(c), 2) for c in contexts]
            if len(contexts) > 1:
                cells.append(_fmt(_ratio(ms[m].get(contexts[-1]), ms[m].get(contexts[0])), 2, "x"))
            if baseline in ms:
                cells += [_fmt(_ratio(ms[baseline].get(c), ms[m].get(c)), 2, "x") for c in contexts]
            body.append(cells)
        sections.append(
            "### Decode latency (ms per generated token, batch 1, greedy, after a prefill of ctx tokens)\n\n"
            f"Context ratio: ms/token at the longest over the shortest context (1.00x = flat). "
            f"`{base_label} / model`: > 1 means faster than {base_label}.\n\n" + _md_table(header, body)
        )

    failures = [row for row in rows if not _ok(row)]
    if failures:
        sections.append(
            "### Not measured (skipped or failed)\n\n"
            + "\n".join(
                f"- {row.get('label') or row['model']} {row['kind']} "
                f"{row.get('seq_len') or row.get('context_len')}: {row['error']}"
                for row in failures
            )
        )
    return "\n\n".join(sections) + "\n"


def save_results(rows: list[dict[str, Any]], path: str, meta: dict[str, Any] | None = None) -> str:
    """Write `{"meta": ..., "rows": [...]}` as JSON; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f, indent=1)
        f.write("\n")
    return path


def _line_plot(
    path: str,
    series: dict[str, dict[int, float | None]],
    labels: dict[str, str],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool,
) -> str:
    from matplotlib.figure import Figure  # no pyplot: does not touch the global backend; renders with Agg
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot()
    for model, per in series.items():
        points = sorted((x, y) for x, y in per.items() if y is not None)
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=labels[model])
    ax.set_xscale("log", base=2)
    xs = sorted({x for per in series.values() for x in per})
    if xs:
        ax.set_xticks(xs, [_length_name(x) for x in xs])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_plots(rows: list[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """`train_throughput.png` (tokens/s vs seq_len) and `decode_latency.png` (ms/token vs context), per model."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    tps, labels, _ = _index(rows, "train", "seq_len", "tokens_per_s")
    if tps:
        paths["train_throughput"] = _line_plot(
            os.path.join(out_dir, "train_throughput.png"),
            tps,
            labels,
            "sequence length (tokens per step fixed)",
            "training tokens/s",
            "Training throughput (fwd + bwd + AdamW)",
            logy=False,
        )
    ms, labels, _ = _index(rows, "decode", "context_len", "ms_per_token")
    if ms:
        paths["decode_latency"] = _line_plot(
            os.path.join(out_dir, "decode_latency.png"),
            ms,
            labels,
            "context length (tokens)",
            "ms per generated token",
            "Greedy decoding latency, batch 1",
            logy=True,
        )
    return paths


def write_report(
    rows: list[dict[str, Any]], out_dir: str, meta: dict[str, Any] | None = None, baseline: str = BASELINE
) -> dict[str, str]:
    """Write `results.json`, `table.md` and the PNG plots into `out_dir`; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"results": save_results(rows, os.path.join(out_dir, "results.json"), meta)}
    tables = format_tables(rows, baseline)
    header = ""
    if meta:
        header = (
            f"Measured {meta.get('time', '')} on {meta.get('processor', '?')}, {meta.get('torch_threads', '?')} threads, "
            f"torch {meta.get('torch', '?')}, transformers {meta.get('transformers', '?')}"
            + (f", load average {meta['load_average'][0]:.2f}" if meta.get("load_average") else "")
            + ".\n"
        )
        if meta.get("suite"):
            header += "Suite: " + ", ".join(f"{k}={v}" for k, v in meta["suite"].items()) + ".\n"
        header += "\n"
    path = os.path.join(out_dir, "table.md")
    with open(path, "w") as f:
        f.write("## hf_extras speed benchmark\n\n" + header + tables)
    paths["table"] = path
    paths.update(save_plots(rows, out_dir))
    return paths


# --------------------------------------------------------------------------------------------------------------------
# command line: `hf-extras bench`
# --------------------------------------------------------------------------------------------------------------------

QUICK = dict(
    seq_lens=(64, 128),
    contexts=(32, 128),
    hidden=64,
    layers=2,
    heads=2,
    tokens_per_step=256,
    train_steps=2,
    train_warmup=1,
    new_tokens=8,
    decode_warmup=2,
)


def parse_bench_args(argv: Sequence[str] | None = None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="hf-extras bench",
        description="Training tokens/s, peak memory and decode latency of hf_extras families against transformers' "
        "Llama (SDPA) and Mamba, one run, one machine; markdown tables on stdout, results.json, table.md and PNG "
        "plots in --out.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (hidden 64, 2 layers, short sequences)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"), help="output folder")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_FAMILIES),
        choices=sorted(MODELS),
        help="models to run (ratios are against llama)",
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", help="training sequence lengths (default 512 2048 8192)")
    parser.add_argument("--contexts", type=int, nargs="+", help="decode context lengths (default 256 8192)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, help="number of layers (default 4)")
    parser.add_argument("--heads", type=int, help="number of heads (default 4)")
    parser.add_argument("--tokens-per-step", type=int, help="training tokens per step (default 8192)")
    parser.add_argument("--steps", type=int, help="timed training steps per configuration (default 3)")
    parser.add_argument("--new-tokens", type=int, help="timed decode steps per context (default 128)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all available cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite from command-line arguments; returns 1 if a configuration failed (skips are not failures)."""
    args = parse_bench_args(argv)
    suite: dict[str, Any] = dict(QUICK) if args.quick else {}
    for key, value in (
        ("seq_lens", args.seq_lens),
        ("contexts", args.contexts),
        ("hidden", args.hidden),
        ("layers", args.layers),
        ("heads", args.heads),
        ("tokens_per_step", args.tokens_per_step),
        ("train_steps", args.steps),
        ("new_tokens", args.new_tokens),
    ):
        if value is not None:
            suite[key] = tuple(value) if isinstance(value, list) else value
    threads = args.threads or available_cores()
    meta = environment_info(threads)
    meta["suite"] = {"models": args.models, "quick": args.quick, **suite}
    print(
        f"hf_extras benchmark: {threads} threads, torch {meta['torch']}, transformers {meta['transformers']}"
        + (f", load average {meta['load_average'][0]:.2f}" if "load_average" in meta else ""),
        flush=True,
    )
    if meta.get("load_average") and meta["load_average"][0] > 0.5 * meta["available_cores"]:
        print(
            f"WARNING: the machine is busy (load average {meta['load_average'][0]:.2f} on {meta['available_cores']} "
            "cores): absolute timings will be noisy (the round-robin keeps ratios fairer).",
            flush=True,
        )
    start = time.perf_counter()
    rows = run_suite(
        families=args.models,
        threads=threads,
        isolate=not args.no_memory,
        progress=lambda message: print(message, flush=True),
        **suite,
    )
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    paths = write_report(rows, args.out, meta)
    print()
    print(format_tables(rows))
    print("wrote " + ", ".join(paths.values()))
    return 1 if any(row.get("error") and not row["error"].startswith("skipped") for row in rows) else 0
