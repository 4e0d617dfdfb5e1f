"""Shared fixtures: tiny configs so the whole suite runs on a CPU in minutes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_extras  # noqa: F401  (registers the Auto classes)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_without_hf_extras(code: str, cwd: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where `import hf_extras` fails (as on a machine without the package)."""
    # same intra-op thread count as this process, so float reductions split the same way (bitwise comparisons)
    prelude = f"import sys, torch\nsys.modules['hf_extras'] = None\ntorch.set_num_threads({torch.get_num_threads()})\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
