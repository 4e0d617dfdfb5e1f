"""Measurements in a fresh child process: peak memory of one training step, and any function (`run_isolated`).

A process's peak resident set size never goes down, so an earlier, larger run would mask a later one, and PyTorch's
CPU allocator is invisible to `tracemalloc`. Each measurement therefore runs in a child forked from a
`multiprocessing` fork server that has only imported the libraries (it never ran a model, so it holds no
freed-but-cached tensor memory); see the `hf_extras.bench` docstring for what the figure includes.
"""

from __future__ import annotations

import resource
import sys

import torch

from .timing import TrainStep, available_cores

__all__ = ["model_recipe", "peak_memory_train_step", "process_memory_mb", "run_isolated", "train_worker"]


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


_PRELOAD = ["torch", "transformers", "hf_extras", "hf_extras.bench.isolation"]


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


def run_isolated(fn, *args):
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


def train_worker(model_class, config, dtype, seq_len, batch_size, steps, warmup, seed, threads):
    """Child: build the model, measure the peak-RSS increase of its first training step, then time `steps` steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = model_class(config).to(dtype)
    trainer = TrainStep(model, seq_len, batch_size, seed)
    before = process_memory_mb("peak")
    first_step_s = trainer.step()
    peak_mem_mb = process_memory_mb("peak") - before
    for _ in range(max(warmup - 1, 0)):  # the memory step counts as the first warmup step
        trainer.step()
    times = [trainer.step() for _ in range(steps)]
    return {"peak_mem_mb": peak_mem_mb, "first_step_s": first_step_s, "step_s_all": times}


def model_recipe(model):
    """What a child needs to rebuild an equivalent model: its class, its config, its dtype (weights are not sent)."""
    return type(model), model.config, next(model.parameters()).dtype


def peak_memory_train_step(model, seq_len: int, batch_size: int, *, seed: int = 0, threads: int | None = None) -> float:
    """MB by which one training step (forward, backward, AdamW step) raises peak RSS, measured in a fresh process.

    The child rebuilds the model from `type(model)(model.config)` (same architecture and dtype, fresh weights: memory
    does not depend on the values), creates AdamW and a random batch, and reports the peak RSS after the step minus
    before it (`process_memory_mb`). The `hf_extras.bench` docstring says what the figure includes.
    """
    threads = threads or available_cores()
    result = run_isolated(train_worker, *model_recipe(model), seq_len, batch_size, 0, 0, seed, threads)
    return result["peak_mem_mb"]
