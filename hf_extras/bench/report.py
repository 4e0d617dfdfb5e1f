"""Reporting suite rows: markdown tables with ratios against the baseline, `results.json`, PNG plots, `table.md`."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .models import BASELINE

__all__ = ["format_tables", "length_name", "save_plots", "save_results", "write_report"]


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
        table.setdefault(row["model"], {})[row[length_key]] = row.get(value_key) if _ok(row) else None
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


def length_name(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def format_tables(rows: list[dict[str, Any]], baseline: str = BASELINE) -> str:
    """Markdown: parameters, training tokens/s, peak memory, decode latency and cache size, each with ratios against
    `baseline`."""
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
        header = ["model"] + [f"{length_name(n)} (x{batches[n]})" for n in seq_lens]
        sections.append(
            "### Training throughput (tokens/s; forward + backward + AdamW; seq_len (x batch))\n\n"
            + _md_table(header, [[labels[m]] + [_fmt(tps[m].get(n)) for n in seq_lens] for m in tps])
        )
        if baseline in tps:
            sections.append(
                f"### Training speed vs {base_label} (model tokens/s / {base_label} tokens/s; > 1 is faster)\n\n"
                + _md_table(
                    ["ratio"] + [length_name(n) for n in seq_lens],
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
                + _md_table(["model"] + [length_name(n) for n in seq_lens], body)
            )

    ms, labels, contexts = _index(rows, "decode", "context_len", "ms_per_token")
    if ms:
        base_label = labels.get(baseline, baseline)
        header = ["model"] + [f"ctx {length_name(c)}" for c in contexts]
        if len(contexts) > 1:
            header.append(f"ctx {length_name(contexts[-1])} / ctx {length_name(contexts[0])}")
        if baseline in ms:
            header += [f"{base_label} / model @ {length_name(c)}" for c in contexts]
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
        cache, _, _ = _index(rows, "decode", "context_len", "cache_bytes")
        if any(v is not None for per in cache.values() for v in per.values()):
            mib = {m: {c: None if b is None else b / 2**20 for c, b in per.items()} for m, per in cache.items()}
            header = ["model"] + [f"ctx {length_name(c)}" for c in contexts]
            if baseline in mib:
                header += [f"/ {base_label} @ {length_name(c)}" for c in contexts]
            body = []
            for m in mib:
                cells = [labels[m]] + [_fmt(mib[m].get(c), 2) for c in contexts]
                if baseline in mib:
                    cells += [_fmt(_ratio(mib[m].get(c), mib[baseline].get(c)), 2, "x") for c in contexts]
                body.append(cells)
            sections.append(
                "### Decode cache (MiB held by the cache after a prefill of ctx tokens, batch 1)\n\n"
                + _md_table(header, body)
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
        ax.set_xticks(xs, [length_name(x) for x in xs])
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
