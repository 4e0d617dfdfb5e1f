"""Smoke test of the speed benchmark: the suite runs on tiny models, rows have their keys, tables and plots are written.

No timing assertions: tests never judge speed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_extras import bench as benchmark

TINY = dict(
    seq_lens=(64,),
    contexts=(16, 64),
    hidden=32,
    layers=1,
    heads=2,
    tokens_per_step=64,
    train_steps=1,
    train_warmup=1,
    new_tokens=2,
    decode_warmup=1,
    threads=1,
)


def test_suite_rows_tables_and_plots(tmp_path):
    families = benchmark.DEFAULT_FAMILIES
    rows = benchmark.run_suite(families=families, **TINY)

    train = [row for row in rows if row["kind"] == "train"]
    decode = [row for row in rows if row["kind"] == "decode"]
    assert [row["model"] for row in train] == list(families)
    assert sorted((row["model"], row["context_len"]) for row in decode) == sorted(
        (name, c) for name in families for c in (16, 64)
    )
    for row in train:
        assert tuple(row) == benchmark.TRAIN_KEYS
        assert row["error"] is None, row["error"]
        assert row["seq_len"] == 64 and row["batch_size"] == 1 and row["tokens_per_step"] == 64
        assert row["tokens_per_s"] > 0 and math.isfinite(row["tokens_per_s"])
        assert len(row["step_s_all"]) == 1
        assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0  # measured in a fresh child process
        assert row["params"] > row["params_non_embedding"] > 0
    for row in decode:
        assert tuple(row) == benchmark.DECODE_KEYS
        assert row["error"] is None, row["error"]
        assert row["ms_per_token"] > 0 and len(row["ms_per_token_all"]) == 2

    tables = benchmark.format_tables(rows)
    for label in (
        "RetNet / Llama tokens/s",
        "GLA / Llama tokens/s",
        "Gated RetNet / Llama tokens/s",
        "ctx 64 / ctx 16",
        "Llama / model @ 64",
        "### Parameters",
        "### Peak memory",
    ):
        assert label in tables

    meta = benchmark.environment_info(threads=1)
    paths = benchmark.write_report(rows, str(tmp_path), meta)
    for name in ("results.json", "table.md", "train_throughput.png", "decode_latency.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert set(paths) == {"results", "table", "train_throughput", "decode_latency"}
    with open(tmp_path / "train_throughput.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["meta"]["torch_threads"] == 1


def test_failed_configuration_is_reported_not_raised():
    rows = [
        dict.fromkeys(benchmark.TRAIN_KEYS)
        | dict(
            kind="train",
            model="llama",
            label="Llama",
            params=10,
            params_non_embedding=5,
            seq_len=64,
            batch_size=1,
            tokens_per_step=64,
            tokens_per_s=100.0,
            peak_mem_mb=3.0,
        ),
        dict.fromkeys(benchmark.TRAIN_KEYS)
        | dict(
            kind="train",
            model="retnet",
            label="RetNet",
            params=12,
            params_non_embedding=6,
            seq_len=64,
            batch_size=1,
            tokens_per_step=64,
            error="RuntimeError: out of memory",
        ),
    ]
    tables = benchmark.format_tables(rows)
    assert "| RetNet / Llama tokens/s | n/a |" in tables
    assert "out of memory" in tables


def test_standalone_measurements():
    spec = benchmark.MODELS["retnet"]
    model = spec.build(benchmark.Dims(hidden_size=32, num_hidden_layers=1, num_heads=2, max_positions=64))
    assert benchmark.train_throughput(model, seq_len=32, batch_size=1, steps=1, warmup=0) > 0
    assert benchmark.decode_latency(model, context_len=8, new_tokens=2, warmup=0) > 0


def test_ffn_width_is_matched_to_llama_parameters():
    dims = benchmark.Dims()
    target = benchmark.llama_non_embedding_params(dims)
    for name in ("retnet", "gla", "gated_retnet", "dyt"):
        with torch.device("meta"):
            model = benchmark.MODELS[name].build(dims)
        got = benchmark.count_parameters(model)["params_non_embedding"]
        # one FFN step of 8 columns is 3 * 8 * 256 * 4 layers = 24,576 parameters: within half a step
        assert abs(got - target) <= 12_288 + 64 * 4, (name, got, target)


def test_models_over_their_limit_are_skipped_and_reported(tmp_path, capsys):
    benchmark.register_model(
        benchmark.ModelSpec(
            "tiny_limited",
            "Limited",
            benchmark.MODELS["retnet"].build,
            max_train_len=32,
            max_decode_context=8,
        )
    )
    try:
        status = benchmark.main(
            [
                "--quick",
                "--models",
                "llama",
                "tiny_limited",
                "--seq-lens",
                "64",
                "--contexts",
                "16",
                "--steps",
                "1",
                "--new-tokens",
                "2",
                "--threads",
                "1",
                "--no-memory",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        del benchmark.MODELS["tiny_limited"]
    out = capsys.readouterr().out
    assert status == 0  # skips are not failures
    assert "### Not measured (skipped or failed)" in out and "Limited train 64: skipped" in out
    assert "Limited decode 16: skipped" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    llama = [row for row in saved["rows"] if row["model"] == "llama"]
    assert all(row["error"] is None for row in llama) and len(llama) == 2


def test_bench_is_an_hf_extras_command(capsys):
    import pytest

    from hf_extras import cli

    with pytest.raises(SystemExit) as exit_:  # argparse's --help exits 0
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "usage: hf-extras bench" in capsys.readouterr().out


HELP_DRIVER = """
import contextlib, io, json, runpy, sys
report = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        report[script] = "no --help exit"
    except SystemExit as exit_:
        report[script] = "ok" if exit_.code in (0, None) and "usage:" in out.getvalue() else f"exit {exit_.code}"
    except BaseException as error:
        report[script] = f"{type(error).__name__}: {error}"
print(json.dumps(report))
"""


def test_every_benchmark_script_imports_and_has_help():
    """Each `benchmarks/*.py --help` runs as `__main__` (one fresh interpreter for all): a renamed or private import,
    or a script without argument parsing, fails here."""
    import subprocess
    import sys
    from pathlib import Path

    scripts = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
    assert len(scripts) >= 9
    result = subprocess.run([sys.executable, "-c", HELP_DRIVER, *scripts], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    failed = {Path(script).name: status for script, status in report.items() if status != "ok"}
    assert not failed, failed


def test_cache_bytes_grow_only_with_attention_layers():
    """Cache after a prefill: Llama holds 2 x layers x width x ctx floats, a pure linear stack the same at any
    context, a 3:1 hybrid a quarter of Llama's growth (one attention block in four)."""
    dims = benchmark.Dims(hidden_size=32, num_hidden_layers=4, num_heads=2, vocab_size=64, max_positions=64)
    per_token = 2 * dims.num_hidden_layers * dims.hidden_size * 4  # keys + values, float32
    sizes = {}
    for name in ("llama", "gated_deltanet", "gated_deltanet_hybrid", "gla_hybrid"):
        torch.manual_seed(0)
        model = benchmark.MODELS[name].build(dims)
        sizes[name] = [benchmark.Decoder(model, ctx).cache_bytes for ctx in (8, 40)]
    assert sizes["llama"] == [8 * per_token, 40 * per_token]
    assert sizes["gated_deltanet"][0] == sizes["gated_deltanet"][1] > 0
    for name in ("gated_deltanet_hybrid", "gla_hybrid"):
        assert sizes[name][1] - sizes[name][0] == 32 * per_token // 4, name


def test_cli_accepts_hybrid_models():
    args = benchmark.parse_bench_args(["--models", "llama", "gated_deltanet", "gated_deltanet_hybrid", "gla_hybrid"])
    assert args.models == ["llama", "gated_deltanet", "gated_deltanet_hybrid", "gla_hybrid"]


@pytest.mark.slow
def test_linearize_demo_runs_end_to_end(tmp_path):
    """`benchmarks/linearize_demo.py` on a 2-step, 32-wide teacher: every run of the pipeline (teacher, linearize
    stages, scratch at equal tokens) completes and the rows hold what the README table reads (about a minute)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import linearize_demo
    from pretrain_teacher import pretrain_teacher

    tiny = ["--hidden_size", "32", "--intermediate_size", "64", "--max_eval_samples", "4"]
    pretrain_teacher(tmp_path / "teacher", 2, tiny)
    out = tmp_path / "demo.json"
    linearize_demo.main(
        ["--teacher", str(tmp_path / "teacher"), "--into", "hfx_gated_retention", "--stage1_steps", "1",
         "--token_fraction", "0.1875", "--batch_size", "2", "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    )  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    # the teacher saw 2 x 16 x 256 tokens; 18.75% of them is 3 steps of 2 x 256: 1 in stage 1, 2 in stage 2
    assert row["tokens"] == row["scratch_tokens"] == 3 * 2 * 256 == 0.1875 * row["teacher_tokens"]
    for key in ("teacher_eval_loss", "copy_eval_loss", "stage1_eval_loss", "stage2_eval_loss", "scratch_eval_loss"):
        assert math.isfinite(row[key]), key
    scratch = json.loads((tmp_path / "runs" / "scratch_hfx_gated_retention" / "config.json").read_text())
    linearized = json.loads((tmp_path / "runs" / "linearize_hfx_gated_retention" / "config.json").read_text())
    for key in ("hidden_size", "num_heads", "gate", "use_rotary", "key_factor", "intermediate_size"):
        assert scratch[key] == linearized[key], key
