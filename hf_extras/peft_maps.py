"""Default PEFT target modules for every hf_extras `model_type`, registered in PEFT's own maps.

PEFT resolves `target_modules=None` (and IA3's `feedforward_modules=None`) by looking the model's `model_type` up in
`peft.utils.constants.TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING`. The LoRA relatives (LoHa, LoKr, OFT,
BOFT, VeRA, ...) each hold their own *copy* of the LoRA map, made when PEFT is imported, so every map is filled
here, not only LoRA's. Each map gets the module role it expects: linear projections for the LoRA family, keys,
values and the FFN output for IA3, the value projection for BEFT, norms for LN tuning, every linear layer for OSF.

Task heads are left to PEFT's `modules_to_save` conventions: our heads are named `score` (sequence and token
classification) and `qa_outputs` (QA), the names PEFT's task models save with the adapter. `head_module_names`
lists what a head-only or parameter-efficient run must also train and save (MLP-Mixer's image `head`, weighted
`layer_features`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["FAMILY_TARGETS", "FamilyTargets", "head_module_names", "register_peft_target_modules"]

# classifier-style heads (transformers' generic names and MLP-Mixer's timm-compatible `head`), saved with adapters
HEAD_MODULES = ("score", "classifier", "qa_outputs", "head")


@dataclass(frozen=True)
class FamilyTargets:
    """Module names (matched as PEFT does: exact or `.`-suffix) of one family, by the role a PEFT method targets."""

    lora: tuple[str, ...]  # the LoRA family's default: the mixer's input and output-side projections
    ia3: tuple[str, ...]  # IA3: rescaled activations (keys, values, FFN output)
    ia3_feedforward: tuple[str, ...]  # IA3: the subset whose *input* is rescaled (FFN output projections)
    value: tuple[str, ...]  # BEFT: a learned bias on the value path
    norms: tuple[str, ...]  # LN tuning
    all_linear: tuple[str, ...]  # OSF and other "every projection" methods


# the softmax attention blocks of a hybrid schedule (`layer_types`): DyT's q/k/v/o names, which the retention and
# delta-rule families share already; the Mamba families list them too (PEFT only needs some name to match)
_ATTENTION_LORA = ("q_proj", "v_proj")
_ATTENTION_IA3 = ("k_proj", "v_proj")
_ATTENTION_ALL = ("q_proj", "k_proj", "v_proj", "o_proj")

_RETENTION = FamilyTargets(
    lora=("q_proj", "v_proj"),
    ia3=("k_proj", "v_proj", "down_proj"),
    ia3_feedforward=("down_proj",),
    value=("v_proj",),
    norms=("mixer_norm", "ffn_norm", "norm"),
    all_linear=("q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

FAMILY_TARGETS: dict[str, FamilyTargets] = {
    "hfx_retnet": _RETENTION,
    "hfx_gated_retention": _RETENTION,
    "hfx_dyt": FamilyTargets(
        lora=("q_proj", "v_proj"),
        ia3=("k_proj", "v_proj", "down_proj"),
        ia3_feedforward=("down_proj",),
        value=("v_proj",),
        norms=("mixer_norm", "ffn_norm", "norm"),
        all_linear=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    # the mixer's big projections (PEFT's Mamba guidance); `dt_proj` is rank-sized and `x_proj` feeds the scan's
    # dt/B/C, both left alone by default
    "hfx_mamba": FamilyTargets(
        lora=("in_proj", "out_proj", *_ATTENTION_LORA),
        ia3=("in_proj", "out_proj", "down_proj", *_ATTENTION_IA3),
        ia3_feedforward=("out_proj", "down_proj"),
        value=("out_proj",),
        norms=("mixer_norm", "ffn_norm", "norm"),
        all_linear=("in_proj", "x_proj", "out_proj", "gate_proj", "up_proj", "down_proj", *_ATTENTION_ALL),
    ),
    # Mamba-2: the same big projections; `dt_bias`, `A_log`, `D` and the gated norm are vectors
    "hfx_mamba2": FamilyTargets(
        lora=("in_proj", "out_proj", *_ATTENTION_LORA),
        ia3=("in_proj", "out_proj", "down_proj", *_ATTENTION_IA3),
        ia3_feedforward=("out_proj", "down_proj"),
        value=("out_proj",),
        norms=("mixer_norm", "ffn_norm", "norm"),
        all_linear=("in_proj", "out_proj", "gate_proj", "up_proj", "down_proj", *_ATTENTION_ALL),
    ),
    # as for retention: q and v, the projections the delta rule reads and writes with
    "hfx_gated_deltanet": FamilyTargets(
        lora=("q_proj", "v_proj"),
        ia3=("k_proj", "v_proj", "down_proj"),
        ia3_feedforward=("down_proj",),
        value=("v_proj",),
        norms=("mixer_norm", "ffn_norm", "norm"),
        all_linear=(
            "q_proj",
            "k_proj",
            "v_proj",
            "b_proj",
            "a_proj",
            "g_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ),
    ),
    # only the channel MLPs: the token-mixing MLP slices and masks its weights (short or causal inputs), which a
    # wrapped `nn.Linear` would silently bypass
    "hfx_mlp_mixer": FamilyTargets(
        lora=("mlp_channels.fc1", "mlp_channels.fc2"),
        ia3=("mlp_channels.fc1", "mlp_channels.fc2"),
        ia3_feedforward=("mlp_channels.fc2",),
        value=("mlp_channels.fc2",),
        norms=("norm1", "norm2", "norm"),
        all_linear=("mlp_channels.fc1", "mlp_channels.fc2"),
    ),
}

# PEFT map name (between TRANSFORMERS_MODELS_TO_ and _TARGET_MODULES_MAPPING / _MODULES_MAPPING) -> role;
# any other target map is a LoRA relative and gets the `lora` role
_MAP_ROLES = {
    "IA3": "ia3",
    "IA3_FEEDFORWARD": "ia3_feedforward",
    "BEFT": "value",
    "LNTUNING": "norms",
    "OSF": "all_linear",
}


def _target_maps() -> dict[str, dict]:
    """Every `model_type -> modules` map in `peft.utils.constants`, keyed by its method name."""
    from peft.utils import constants

    maps = {}
    for name, value in vars(constants).items():
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(value, dict)):
            continue
        method = name.removeprefix("TRANSFORMERS_MODELS_TO_")
        for suffix in ("_TARGET_MODULES_MAPPING", "_MODULES_MAPPING"):
            if method.endswith(suffix):
                maps[method.removesuffix(suffix)] = value
                break
    return maps


def register_peft_target_modules() -> list[str]:
    """Add every hf_extras `model_type` to every PEFT target-module map (in place, idempotent).

    PEFT's tuner classes hold references to these very dicts, so `get_peft_model(model, LoraConfig(...))` with no
    `target_modules` works afterwards for every family. Returns the names of the maps filled.
    """
    filled = []
    for method, mapping in _target_maps().items():
        role = _MAP_ROLES.get(method, "lora")
        for model_type, targets in FAMILY_TARGETS.items():
            mapping[model_type] = list(getattr(targets, role))
        filled.append(method)
    return filled


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules of a task model that are trained from scratch and must be saved with an adapter.

    The classifier head (`score`, `qa_outputs`, MLP-Mixer's `head`, ...) and, when the config enables them, the
    weighted `layer_features`. A language-model head is tied to the input embeddings and is not listed.
    """
    children = dict(model.named_children())
    names = [name for name in HEAD_MODULES if isinstance(children.get(name), nn.Module)]
    if isinstance(children.get("layer_features"), nn.Module):
        names.append("layer_features")
    return names
