"""The package's import graph: one way only, no circle, and `import hf_extras` stays light.

Layers, bottom to top: `errors` <- `models` <- `data` <- the integrations (`registration`, `peft_maps`, `pipelines`,
`adapters`, `finetune`, `convert`, `model_card`, `dyt`, the package root) <- `tasks` <- `training` and `bench` (the
benchmark harness) <- `cli`. A module may import its own layer and the layers below; `models/` imports only `models/` (saved checkpoints
copy it as remote code). Every `import` statement counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_extras"

# first dotted part below hf_extras -> layer (higher may import lower); "" is the package root
LAYERS = {"errors": 0, "models": 1, "data": 2, "tasks": 4, "training": 5, "bench": 5, "cli": 6}
INTEGRATION = 3  # every other module: registration, peft_maps, pipelines, adapters, finetune, convert, ...


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("hf_extras", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module `name` is (or lives in): `hf_extras.a.b.attr` -> `hf_extras.a.b`; None outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Package modules `module` imports anywhere in its file (module level and inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in map(_resolve, targets) if t is not None and t != module)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], INTEGRATION) if len(parts) > 1 else INTEGRATION


def test_the_walker_sees_imports():
    """Guards the test itself: known edges, relative and absolute, module level and in functions, are found."""
    assert "hf_extras.models.configuration_retnet" in GRAPH["hf_extras.models.modeling_retnet"]
    assert "hf_extras.registration" in GRAPH["hf_extras"]
    assert "hf_extras.errors" in GRAPH["hf_extras.finetune"]
    assert "hf_extras.training" in GRAPH["hf_extras.cli"]  # `from .training import run` inside a function
    assert "hf_extras.tasks.base" in GRAPH["hf_extras.tasks.causal_lm"]


def test_no_import_circle():
    """Depth-first search over the whole graph; the first circle found is reported in full."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (circle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(circle))


def test_imports_point_down():
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            if module.startswith("hf_extras.models") and not target.startswith("hf_extras.models"):
                wrong.append(f"{module} -> {target} (models/ imports only models/: saved checkpoints copy it)")
            elif _layer(target) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) -> {target} (layer {_layer(target)})")
    assert not wrong, "imports pointing up:\n" + "\n".join(sorted(wrong))


HEAVY = (
    "datasets",
    "matplotlib",
    "sklearn",
    "hf_extras.tasks",
    "hf_extras.training",
    "hf_extras.cli",
    "hf_extras.bench",
)


def test_import_hf_extras_is_light():
    """`import hf_extras` registers the families and the QA pipeline without the data/training stack."""
    code = (
        "import json, sys, hf_extras\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "print(json.dumps({'loaded': loaded, 'qa': 'question-answering' in PIPELINE_REGISTRY.supported_tasks}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["qa"], "the question-answering pipeline must register on import"
    assert report["loaded"] == [], f"`import hf_extras` loaded {report['loaded']}"
