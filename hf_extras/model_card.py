"""Model card (`README.md`) for a run folder written by `hf-extras train`.

Why our own: transformers' `Trainer.create_model_card` knows nothing of hf_extras families, offline data or the
`trust_remote_code` story, and the card is the first thing a reader of a pushed folder sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

__all__ = ["FAMILIES", "ModelCardInfo", "family_name", "render_model_card", "write_model_card"]

# model_type -> (family name, one-line description)
FAMILIES: dict[str, tuple[str, str]] = {
    "hfx_dyt": (
        "DyT Transformer",
        "softmax multi-head attention with Dynamic Tanh `gamma * tanh(alpha * x) + beta` in place of normalisation",
    ),
    "hfx_retnet": ("RetNet", "multi-scale retention with a fixed decay per head (Sun et al. 2023)"),
    "hfx_gated_retention": (
        "Gated retention",
        "gated linear attention with a data-dependent decay per head (gRetNet) or per key channel (GLA)",
    ),
    "hfx_mamba": ("Mamba-style", "selective state-space (S6) mixer with a depthwise causal conv (Gu & Dao 2023)"),
    "hfx_mamba2": (
        "Mamba-2",
        "state-space duality (SSD): a selective SSM with one decay per head, run as decayed linear attention "
        "(Dao & Gu 2024)",
    ),
    "hfx_mlp_mixer": ("MLP-Mixer", "token-mixing and channel-mixing MLPs (Tolstikhin et al. 2021)"),
    "hfx_gated_deltanet": (
        "Gated DeltaNet",
        "the gated delta rule: a memory corrected per token, with a data-dependent decay (Yang et al. 2025)",
    ),
}

# config fields shown in the architecture table, when the config has them
_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_heads",
    "intermediate_size",
    "ffn_type",
    "norm_type",
    "forward_mode",
    "chunk_size",
    "vocab_size",
    "tie_word_embeddings",
)


@dataclass
class ModelCardInfo:
    """What the card reports; `training` and `results` are rendered as tables in the given order."""

    config: PreTrainedConfig
    task: str
    pipeline_tag: str
    auto_class: str  # e.g. "AutoModelForCausalLM"
    num_parameters: int
    data: str  # one or two sentences on the data used
    training: dict[str, Any] = field(default_factory=dict)
    results: list[tuple[str, float | None, float | None]] = field(default_factory=list)  # (metric, untrained, trained)
    train_loss: float | None = None
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids, for the card's metadata
    sample: dict[str, str] | None = None  # {"prompt", "completion", "decoding"}
    loss_curve: str | None = None  # image path relative to the folder


def family_name(model_type: str, config: PreTrainedConfig | None = None) -> str:
    """Display name of a family (`hfx_retnet` -> `RetNet`); unknown types fall back to the config class name."""
    if model_type in FAMILIES:
        return FAMILIES[model_type][0]
    return type(config).__name__.removesuffix("Config") if config is not None else model_type


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_model_card(info: ModelCardInfo) -> str:
    """The card as Markdown with Hub YAML metadata."""
    config = info.config
    model_type = config.model_type
    family = family_name(model_type, config)
    description = FAMILIES.get(model_type, (family, ""))[1]
    tags = ["hf_extras", model_type, info.task.replace("_", "-")]
    meta = ["---", "library_name: transformers", f"pipeline_tag: {info.pipeline_tag}", "tags:"]
    meta += [f"- {t}" for t in tags]
    if info.datasets:
        meta += ["datasets:"] + [f"- {d}" for d in info.datasets]
    meta.append("---")

    architecture = [("family", f"{family} (`{model_type}`)"), ("parameters", info.num_parameters)]
    architecture += [(name, getattr(config, name)) for name in _ARCHITECTURE_FIELDS if hasattr(config, name)]

    parts = [
        "\n".join(meta),
        f"# {family} `{info.task}` model trained with hf_extras",
        f'A {info.num_parameters / 1e6:.2f}M-parameter **{family}** (`model_type="{model_type}"`)'
        + (f": {description}." if description else ".")
        + f" Trained for the `{info.task}` task with `hf-extras train` (Hugging Face `Trainer`).",
        "## Architecture",
        _table(("", "value"), architecture),
        "## Data",
        info.data,
        "## Training",
        _table(("setting", "value"), list(info.training.items())),
        "## Results",
        _table(("metric", "untrained", "trained"), info.results)
        + (f"\n\nFinal training loss: {_fmt(info.train_loss)}." if info.train_loss is not None else ""),
    ]
    if info.loss_curve:
        parts.append(f"![loss curve]({info.loss_curve})")
    if info.sample:
        parts += [
            f"## Sample ({info.sample['decoding']})",
            "```text\n" + info.sample["prompt"] + info.sample["completion"] + "\n```",
        ]
    parts += [
        "## How to load",
        (
            "```python\n"
            f"from transformers import {info.auto_class}, AutoTokenizer\n\n"
            'path = "path/to/this/folder"  # or a Hub repo id\n'
            f"model = {info.auto_class}.from_pretrained(path, trust_remote_code=True)\n"
            "tokenizer = AutoTokenizer.from_pretrained(path)\n"
            "```"
        ),
        (
            "The folder carries the modeling code (`auto_map` in `config.json`), so `trust_remote_code=True` loads it "
            "on a machine without hf_extras. With hf_extras installed, `import hf_extras` registers "
            f"`{model_type}` with the Auto classes and `trust_remote_code` is not needed."
        ),
    ]
    return "\n\n".join(parts) + "\n"


def write_model_card(folder: str | Path, info: ModelCardInfo) -> Path:
    """Write `README.md` into `folder` and return its path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(info), encoding="utf-8")
    return path
