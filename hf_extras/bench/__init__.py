"""Speed benchmark harness (`hf-extras bench`): hf_extras families side by side with transformers' Llama, measured in one run on one machine.

Three measurements, each a plain function usable on its own:

* `train_throughput(model, seq_len, batch_size, steps, warmup)` -- tokens/s of a full training step (forward with
  `labels=input_ids`, backward, `AdamW.step`) on random token ids; median over `steps` timed steps after `warmup`.
* `decode_latency(model, context_len, new_tokens, warmup)` -- ms per generated token, batch 1, greedy, through the
  model's own cache (`RecurrentCache` for hf_extras, `DynamicCache` for Llama) after a prefill of `context_len`
  tokens. Only the one-token decode steps are timed (median), never the prefill. `cache_bytes(cache)` is the tensor
  storage the cache holds after the prefill (keys/values grow with the context, recurrent states do not).
* `peak_memory_train_step(model, seq_len, batch_size)` -- how much one training step raises the process's peak
  resident set size (RSS), in MB. See "Memory method" below.

`run_suite(...)` runs them for a list of models (`MODELS`, name -> `ModelSpec` whose `build(dims)` makes a causal LM
of a given width and depth; add a family with `register_model`) and returns result rows (dicts); `format_tables`
turns rows into markdown tables with ratios against the baseline (Llama), `save_plots` writes PNGs, `write_report`
writes everything into a folder. `main(argv)` is `hf-extras bench` (and `benchmarks/run_cpu.py`).

One job per module: `models` (what is measured), `timing` (train and decode timers), `isolation` (fresh child
processes, peak memory), `suite` (the round-robin run), `report` (tables, JSON, plots), `cli` (argument parsing).
Not imported by `import hf_extras`.

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

from .cli import QUICK, main, parse_bench_args
from .isolation import model_recipe, peak_memory_train_step, process_memory_mb, run_isolated, train_worker
from .models import (
    BASELINE,
    DEFAULT_FAMILIES,
    FAMILY_DIMS,
    FAMILY_NAMES,
    FAMILY_VARIANTS,
    MODELS,
    Dims,
    ModelSpec,
    count_parameters,
    family_causal_lm,
    glu_intermediate_size,
    llama_non_embedding_params,
    register_model,
)
from .report import format_tables, save_plots, save_results, write_report
from .suite import DECODE_KEYS, TRAIN_KEYS, environment_info, run_suite
from .timing import Decoder, TrainStep, available_cores, cache_bytes, decode_latency, median, train_throughput

__all__ = [
    "BASELINE",
    "DECODE_KEYS",
    "DEFAULT_FAMILIES",
    "FAMILY_DIMS",
    "FAMILY_NAMES",
    "FAMILY_VARIANTS",
    "MODELS",
    "QUICK",
    "TRAIN_KEYS",
    "Decoder",
    "Dims",
    "ModelSpec",
    "TrainStep",
    "available_cores",
    "cache_bytes",
    "count_parameters",
    "decode_latency",
    "environment_info",
    "family_causal_lm",
    "format_tables",
    "glu_intermediate_size",
    "llama_non_embedding_params",
    "main",
    "median",
    "model_recipe",
    "parse_bench_args",
    "peak_memory_train_step",
    "process_memory_mb",
    "register_model",
    "run_isolated",
    "run_suite",
    "save_plots",
    "save_results",
    "train_throughput",
    "train_worker",
    "write_report",
]
