"""Bottleneck adapters for every hf_extras family (PEFT has none): add, switch, train, save and load by name.

An adapter is `y + scaling * up(act(down(y)))` applied to a block's sub-layer output `y` before the block's residual
addition. Houlsby placement adapts the token mixer's and the FFN's outputs, Pfeiffer placement only the FFN's (the
mixer's in a block without FFN, e.g. Mamba's default). `up` starts at zero, so adding an adapter leaves the model's
outputs unchanged until it is trained.

Adapters attach through forward hooks on the block's sub-modules, and their weights live in a `ModuleDict` named
`bottleneck_adapters` on each block: the base model's parameter names and code stay as they are, and several
adapters can sit on one base, one of them active at a time. Only the adapter's (and the task head's) weights are
saved: `safetensors` plus a JSON config. Functions, not methods, so nothing collides with transformers'
`PreTrainedModel.add_adapter` (its PEFT integration).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.activations import ACT2FN

from .models.backbone import SequenceBlock
from .models.modeling_mlp_mixer import MixerBlock
from .models.norms import DyT, RMSNorm
from .peft_maps import head_module_names

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "BottleneckAdapter",
    "BottleneckConfig",
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "list_adapters",
    "load_adapter",
    "save_adapter",
    "set_active_adapter",
    "set_trainable_modules",
    "train_adapter",
]

ADAPTER_CONFIG_NAME = "bottleneck_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "bottleneck_adapter.safetensors"
CONTAINER = "bottleneck_adapters"  # the per-block ModuleDict holding adapters by name
PLACEMENTS = {"houlsby": ("mixer", "ffn"), "pfeiffer": ("ffn",)}
NORM_TYPES = (nn.LayerNorm, RMSNorm, DyT)


@dataclass
class BottleneckConfig:
    """How a bottleneck adapter is built and where it sits.

    - `bottleneck_size`: width of the down-projection (trainable parameters per adapted sub-layer:
      `2 * hidden_size * bottleneck_size + bottleneck_size + hidden_size`).
    - `placement`: `"houlsby"` (after the token mixer and after the FFN) or `"pfeiffer"` (after the FFN only).
    - `activation`: a `transformers.activations.ACT2FN` name.
    - `residual`: keep the adapter's own skip connection (`y + f(y)`); without it the adapter's output replaces the
      sub-layer's, which is *not* the identity at initialisation (the zero `up` silences the sub-layer).
    - `scaling`: multiplies `f(y)`. `dropout`: on the bottleneck activations during training.
    """

    bottleneck_size: int = 16
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    activation: str = "gelu"
    residual: bool = True
    scaling: float = 1.0
    dropout: float = 0.0

    def __post_init__(self):
        if (
            isinstance(self.bottleneck_size, bool)
            or not isinstance(self.bottleneck_size, int)
            or self.bottleneck_size < 1
        ):
            raise ValueError(f"BottleneckConfig.bottleneck_size must be a positive int, got {self.bottleneck_size!r}.")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"BottleneckConfig.placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}.")
        if self.activation not in ACT2FN:
            raise ValueError(
                f"BottleneckConfig.activation {self.activation!r} is not a transformers activation; "
                "use e.g. 'gelu', 'relu' or 'silu'."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BottleneckConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    @classmethod
    def from_dict(cls, values: dict) -> BottleneckConfig:
        """Build from a saved dict; unknown keys are an error (a file from another tool or version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BottleneckConfig keys {unknown}; valid keys: {sorted(known)}.")
        return cls(**values)


class BottleneckAdapter(nn.Module):
    """`y + scaling * up(dropout(act(down(y))))`, `up` zero-initialised."""

    def __init__(self, hidden_size: int, config: BottleneckConfig):
        super().__init__()
        self.down = nn.Linear(hidden_size, config.bottleneck_size)
        self.act = ACT2FN[config.activation]
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(config.bottleneck_size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scaling = config.scaling
        self.residual = config.residual

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.dropout(self.act(self.down(hidden_states)))) * self.scaling
        return hidden_states + delta if self.residual else delta


class _BlockAdapters(nn.ModuleDict):
    """One block's adapters by name (each a ModuleDict of sub-layer slot -> adapter) and the active name."""

    def __init__(self):
        super().__init__()
        self.active: str | None = None
        self.hook_handles: list = []


def _sublayers(block: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """The block's adaptable sub-layers: slot -> (module, dimension of its output that holds the channels)."""
    if isinstance(block, SequenceBlock):
        slots = {"mixer": (block.mixer, -1)}
        if block.ffn is not None:
            slots["ffn"] = (block.ffn, -1)
        return slots
    if isinstance(block, MixerBlock):  # the token-mixing MLP returns (batch, channels, tokens)
        return {"mixer": (block.mlp_tokens, 1), "ffn": (block.mlp_channels, -1)}
    raise TypeError(f"{type(block).__name__} is not an hf_extras block")


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = [m for m in model.modules() if isinstance(m, (SequenceBlock, MixerBlock))]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no hf_extras blocks (SequenceBlock / MixerBlock): bottleneck adapters "
            "attach to hf_extras models only; for other models use PEFT."
        )
    return blocks


def _slots_for(block: nn.Module, placement: str) -> list[str]:
    """Sub-layers a placement adapts in this block; a block without FFN puts a Pfeiffer adapter after its mixer."""
    available = _sublayers(block)
    wanted = [slot for slot in PLACEMENTS[placement] if slot in available]
    return wanted or ["mixer"]


def _make_hook(container: _BlockAdapters, slot: str, channel_dim: int):
    def hook(module, args, output):
        name = container.active
        if name is None or slot not in container[name]:
            return output
        adapter = container[name][slot]
        first = output[0] if isinstance(output, tuple) else output  # the FFN returns (output, aux_loss)
        if channel_dim == -1:
            adapted = adapter(first)
        else:
            adapted = adapter(first.transpose(channel_dim, -1)).transpose(channel_dim, -1)
        return (adapted, *output[1:]) if isinstance(output, tuple) else adapted

    return hook


def _container(block: nn.Module) -> _BlockAdapters:
    """The block's adapter container, created (with its hooks) on first use."""
    container = getattr(block, CONTAINER, None)
    if container is None:
        container = _BlockAdapters()
        block.add_module(CONTAINER, container)
        for slot, (module, channel_dim) in _sublayers(block).items():
            container.hook_handles.append(module.register_forward_hook(_make_hook(container, slot, channel_dim)))
    return container


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the bottleneck adapters on `model`, in the order they were added."""
    container = getattr(_blocks(model)[0], CONTAINER, None)
    return list(container.keys()) if container is not None else []


def _check_known(model: nn.Module, name: str) -> None:
    known = list_adapters(model)
    if name not in known:
        raise KeyError(f"no bottleneck adapter named {name!r} on this model; adapters: {known or 'none'}.")


def add_adapter(model: nn.Module, name: str, config: BottleneckConfig | None = None, set_active: bool = True) -> None:
    """Insert a new bottleneck adapter `name` into every block of `model` (on the blocks' device and dtype).

    The model's outputs are unchanged until it is trained (zero `up`, with `residual=True`). `set_active` makes it
    the adapter that runs; others stay attached but inactive.
    """
    config = config or BottleneckConfig()
    if not name or "." in name or not name.isidentifier():
        raise ValueError(f"adapter name must be a Python identifier (it becomes a module name), got {name!r}.")
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}: delete_adapter() it or pick another name.")
    hidden_size = model.config.hidden_size
    for block in _blocks(model):
        reference = next(block.parameters())
        slots = nn.ModuleDict(
            {slot: BottleneckAdapter(hidden_size, config) for slot in _slots_for(block, config.placement)}
        ).to(device=reference.device, dtype=reference.dtype)
        slots.bottleneck_config = config
        _container(block)[name] = slots
    if set_active:
        set_active_adapter(model, name)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Run adapter `name` from now on (`None`: run the base model, every adapter bypassed)."""
    if name is not None:
        _check_known(model, name)
    for block in _blocks(model):
        container = getattr(block, CONTAINER, None)
        if container is not None:
            container.active = name


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that runs, or `None`."""
    container = getattr(_blocks(model)[0], CONTAINER, None)
    return container.active if container is not None else None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (and, once no adapter is left, the hooks)."""
    _check_known(model, name)
    for block in _blocks(model):
        container = getattr(block, CONTAINER)
        del container[name]
        if container.active == name:
            container.active = None
        if len(container) == 0:
            for handle in container.hook_handles:
                handle.remove()
            delattr(block, CONTAINER)


def adapter_config(model: nn.Module, name: str) -> BottleneckConfig:
    """The `BottleneckConfig` adapter `name` was built with."""
    _check_known(model, name)
    return getattr(_blocks(model)[0], CONTAINER)[name].bottleneck_config


def _adapter_prefixes(model: nn.Module, name: str) -> list[str]:
    return [
        f"{block_name}.{CONTAINER}.{name}"
        for block_name, block in model.named_modules()
        if isinstance(block, (SequenceBlock, MixerBlock))
    ]


def _norm_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES) and f".{CONTAINER}." not in f".{n}."]


def set_trainable_modules(model: nn.Module, module_names: list[str]) -> None:
    """Freeze every parameter of `model` except those of the named modules (names as in `named_modules()`)."""
    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing} in {type(model).__name__}.")
    model.requires_grad_(False)
    for n in module_names:
        modules[n].requires_grad_(True)


def train_adapter(model: nn.Module, name: str, train_head: bool = True, train_norms: bool = False) -> None:
    """Activate adapter `name` and make it the only trainable part of `model`, with the task head
    (`score`, `qa_outputs`, ..., and weighted `layer_features`) when `train_head`, and every norm when `train_norms`.
    """
    _check_known(model, name)
    set_active_adapter(model, name)
    names = _adapter_prefixes(model, name)
    if train_head:
        names += head_module_names(model)
    if train_norms:
        names += _norm_module_names(model)
    set_trainable_modules(model, names)


def _state_for(model: nn.Module, prefixes: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {
        k: v.detach().contiguous().clone() for k, v in state.items() if any(k.startswith(p + ".") for p in prefixes)
    }


def save_adapter(
    model: nn.Module, directory: str | Path, name: str | None = None, save_head: bool = True, save_norms: bool = False
) -> Path:
    """Write adapter `name` (default: the active one) to `directory`: weights as safetensors, config as JSON.

    Only the adapter's weights are written, plus the task head's (`save_head`) and the norms' (`save_norms`, for an
    adapter trained with `train_norms=True`); the JSON records what the base model must be for them to load.
    """
    name = name or active_adapter(model)
    if name is None:
        raise ValueError("no adapter is active: pass the name of the adapter to save.")
    _check_known(model, name)
    head = head_module_names(model) if save_head else []
    norms = _norm_module_names(model) if save_norms else []
    tensors = _state_for(model, _adapter_prefixes(model, name))
    tensors.update(_state_for(model, head + norms))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    info = {
        "adapter_name": name,
        "bottleneck_config": asdict(adapter_config(model, name)),
        "model_type": model.config.model_type,
        "model_class": type(model).__name__,
        "hidden_size": model.config.hidden_size,
        "num_blocks": len(_blocks(model)),
        "head_modules": head,
        "norms_saved": bool(norms),
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
    }
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None, set_active: bool = True) -> str:
    """Add the adapter saved in `directory` to `model` (as `name`, default its saved name) and load its weights,
    head and norms included when they were saved. Returns the adapter's name.

    Refuses, naming the difference, a model of another `model_type`, width or depth, or weights that do not match
    the model's parameter names and shapes.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a folder written by hf_extras.adapters.save_adapter().")
    info = json.loads(config_path.read_text())
    for key, actual in (
        ("model_type", model.config.model_type),
        ("hidden_size", model.config.hidden_size),
        ("num_blocks", len(_blocks(model))),
    ):
        if info[key] != actual:
            raise ValueError(
                f"adapter in {directory} was trained on a model with {key}={info[key]!r}, this model has {actual!r}."
            )
    saved_name, name = info["adapter_name"], name or info["adapter_name"]
    tensors = load_file(str(weights_path))
    renamed = {k.replace(f".{CONTAINER}.{saved_name}.", f".{CONTAINER}.{name}."): v for k, v in tensors.items()}
    add_adapter(model, name, BottleneckConfig.from_dict(info["bottleneck_config"]), set_active=False)
    state = model.state_dict()
    unknown = [k for k in renamed if k not in state]
    wrong_shape = [k for k in renamed if k in state and state[k].shape != renamed[k].shape]
    expected = set(_state_for(model, _adapter_prefixes(model, name) + info["head_modules"]))
    absent = sorted(expected - set(renamed))
    if unknown or wrong_shape or absent:
        delete_adapter(model, name)
        raise ValueError(
            f"adapter weights in {weights_path} do not fit {type(model).__name__} (saved from "
            f"{info.get('model_class')}): unknown keys {unknown[:5]}, shape mismatches {wrong_shape[:5]}, "
            f"missing keys {absent[:5]}."
        )
    model.load_state_dict(renamed, strict=False)
    if set_active:
        set_active_adapter(model, name)
    return name
