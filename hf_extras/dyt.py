"""Turn any transformers model into a normalization-free one: every LayerNorm / RMSNorm becomes a `DyT`.

    >>> import hf_extras
    >>> model = transformers.LlamaForCausalLM(config)
    >>> hf_extras.convert_norms_to_dyt(model)          # in place; returns the model
    >>> ...train...
    >>> model.save_pretrained("ckpt")                  # as usual: DyT's alpha/weight/bias are in the safetensors
    >>> again = hf_extras.load_dyt_model("ckpt")       # same outputs as `model`

Why `load_dyt_model`: the saved folder still names the original architecture (`LlamaForCausalLM`), whose norms have
no `alpha` (and RMSNorm has no `bias`), so a plain `from_pretrained` would drop those tensors and rebuild normalised
layers. `convert_norms_to_dyt` records what it converted in `config.dyt_conversion`; `load_dyt_model` builds the
original architecture, converts the same modules, and only then loads the checkpoint (strictly: every tensor, DyT's
included, must match).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .models.norms import DyT

AlphaInit = float | Callable[[str, nn.Module], float]


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm over the last dimension: `nn.LayerNorm`, `nn.RMSNorm` and every class whose name ends in
    `LayerNorm` or `RMSNorm` (LlamaRMSNorm, T5LayerNorm, ...). Gated variants (`...RMSNormGated`) take a second
    input and are not norms DyT can replace."""
    if isinstance(module, DyT):
        return False
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _norm_shape(module: nn.Module) -> tuple[int, ...]:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        shape = getattr(module, "hidden_size", None)
    if shape is None:
        raise ValueError(f"Cannot tell the width of {type(module).__name__}: it has no `weight` or `normalized_shape`.")
    return tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (int(shape),)


def norm_to_dyt(module: nn.Module, alpha_init: float = 0.5) -> DyT:
    """A `DyT` of the norm's width that keeps its affine part (`weight`, `bias`) and starts at `alpha_init`."""
    if getattr(module, "data_format", "channels_last") != "channels_last":
        raise NotImplementedError(
            f"{type(module).__name__} normalises over channels-first inputs; DyT here acts on the last dimension."
        )
    shape = _norm_shape(module)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    ref = weight if isinstance(weight, torch.Tensor) else next(module.parameters(), None)
    dyt = DyT(shape[0] if len(shape) == 1 else shape, alpha_init)
    if ref is not None:
        dyt = dyt.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if isinstance(weight, torch.Tensor):
            gain = weight.detach()
            if type(module).__name__.startswith("Gemma"):  # Gemma's norms scale by (1 + weight)
                gain = gain + 1.0
            dyt.weight.copy_(gain.reshape(dyt.weight.shape))
        if isinstance(bias, torch.Tensor):
            dyt.bias.copy_(bias.detach().reshape(dyt.bias.shape))
    if isinstance(weight, torch.Tensor) and not weight.requires_grad:
        dyt.requires_grad_(False)
    return dyt


def convert_norms_to_dyt(
    model: nn.Module, alpha_init: AlphaInit = 0.5, modules: Iterable[str] | None = None
) -> nn.Module:
    """Replace every LayerNorm and RMSNorm in `model` with `DyT` (in place) and return the model.

    Each DyT has the norm's width, copies its `weight` and `bias` (the affine part is kept, so a pretrained model
    starts close to where it was) and starts at `alpha = alpha_init`, a float (0.5 is the paper's default) or a
    function `(module_name, norm) -> float`, e.g. the paper's LLM rule with a larger alpha before attention:
    `lambda name, norm: 0.8 if "input_layernorm" in name else 0.2` (Llama, width 4096).

    `modules` restricts the conversion to those module names (as `load_dyt_model` does). If the model has a
    `config`, `config.dyt_conversion` records the converted module names, so `save_pretrained` keeps them; reload
    the saved folder with `load_dyt_model`.
    """
    wanted = set(modules) if modules is not None else None
    if is_norm_layer(model) and (wanted is None or "" in wanted):
        return norm_to_dyt(model, alpha_init("", model) if callable(alpha_init) else alpha_init)
    converted: dict[int, DyT] = {}  # shared norm instances stay shared
    names: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not is_norm_layer(module) or (wanted is not None and name not in wanted):
            continue
        if id(module) not in converted:
            alpha = alpha_init(name, module) if callable(alpha_init) else alpha_init
            converted[id(module)] = norm_to_dyt(module, float(alpha))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, converted[id(module)])
        names.append(name)
    if wanted is not None and set(names) != wanted:
        raise ValueError(f"No LayerNorm/RMSNorm to convert at: {sorted(wanted - set(names))}.")
    config = getattr(model, "config", None)
    if config is not None:  # merged with an earlier conversion's record (converting twice keeps both)
        earlier = (getattr(config, "dyt_conversion", None) or {}).get("modules", [])
        config.dyt_conversion = {"modules": sorted(set(earlier) | set(names))}
    return model


def _converted_class(model_class: type, modules: list[str]) -> type:
    """A subclass of `model_class` that converts `modules` right after building, so that `from_pretrained` loads
    every tensor (DyT's included) through transformers' own machinery: key renames, tied weights, shards, dtypes."""

    def __init__(self, *args, **kwargs):
        model_class.__init__(self, *args, **kwargs)
        convert_norms_to_dyt(self, modules=modules)

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__})


def load_dyt_model(folder: str, model_class=None, **from_pretrained_kwargs):
    """Load a folder saved from a model converted with `convert_norms_to_dyt`, with identical outputs.

    `model_class` is the class to load with (a model class or an Auto class); by default the architecture named in
    the config (`config.architectures[0]`). Extra keyword arguments go to `from_pretrained` (dtype, device_map, ...).
    The converted architecture is built first and then loaded, so a tensor missing from the folder (or one the
    model does not have) is an error rather than a silently re-initialised layer.
    """
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        folder, trust_remote_code=from_pretrained_kwargs.get("trust_remote_code", False)
    )
    conversion = getattr(config, "dyt_conversion", None)
    if not conversion:
        raise ValueError(
            f"{folder} was not saved from a model converted with `convert_norms_to_dyt` (no `dyt_conversion` in its "
            "config): load it with `from_pretrained`, then convert."
        )
    if model_class is None:
        if not config.architectures:
            raise ValueError("The config names no architecture: pass `model_class`.")
        model_class = getattr(transformers, config.architectures[0])
    if hasattr(model_class, "_model_mapping"):  # an Auto class: the concrete class for this config
        model_class = model_class._model_mapping[type(config)]
    model, info = _converted_class(model_class, list(conversion["modules"])).from_pretrained(
        folder, output_loading_info=True, **from_pretrained_kwargs
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"Loading the converted model from {folder} did not match its checkpoint: {problems}")
    model.__class__ = model_class  # the helper subclass only changed construction
    return model


__all__ = ["convert_norms_to_dyt", "load_dyt_model", "norm_to_dyt", "is_norm_layer"]
