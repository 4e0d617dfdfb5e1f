"""The benchmarked models: name -> `ModelSpec` whose `build(dims)` makes a causal LM of a given width and depth.

`MODELS` holds transformers' Llama (SDPA, the baseline), hf_extras' families and transformers' Mamba; add one with
`register_model`. `family_causal_lm(name)` builds one hf_extras family variant at the fixed benchmark size used by the
scripts that compare a family with itself (`benchmarks/checkpointing_memory.py`, `benchmarks/compile_speed.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BASELINE",
    "DEFAULT_FAMILIES",
    "FAMILY_DIMS",
    "FAMILY_NAMES",
    "FAMILY_VARIANTS",
    "MODELS",
    "Dims",
    "ModelSpec",
    "count_parameters",
    "family_causal_lm",
    "glu_intermediate_size",
    "llama_non_embedding_params",
    "register_model",
]


def glu_intermediate_size(hidden_size: int) -> int:
    """hf_extras' default SwiGLU width: 8/3 x hidden, rounded up to a multiple of 8 (Llama-style)."""
    return 8 * ((8 * hidden_size // 3 + 7) // 8)


@dataclass(frozen=True)
class Dims:
    """Width and depth every model of one suite shares."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None  # None: glu_intermediate_size(hidden_size)
    vocab_size: int = 264
    max_positions: int = 8192  # Llama's max_position_embeddings; the suite sets it to the longest input

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else glu_intermediate_size(self.hidden_size)

    def hfx_kwargs(self) -> dict[str, Any]:
        """The shared hf_extras config fields."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_heads=self.num_heads,
            intermediate_size=self.ffn_size,
            ffn_type="glu",
        )


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: `build(dims)` returns a causal LM (a transformers `PreTrainedModel`).

    `max_train_len` / `max_decode_context`: longer runs are skipped and reported as such (for baselines whose CPU
    path would take hours, e.g. transformers' Mamba without its CUDA kernels).
    """

    name: str
    label: str
    build: Callable[[Dims], torch.nn.Module]
    description: str = ""
    max_train_len: int | None = None
    max_decode_context: int | None = None


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a model in `MODELS`; later families register themselves here."""
    MODELS[spec.name] = spec
    return spec


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters (tied weights once) and the same without the token embedding / LM head."""
    total = sum(p.numel() for p in model.parameters())
    embedding = 0
    seen = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            embedding += weight.numel()
    return {"params": total, "params_non_embedding": total - embedding}


def _llama_config(dims: Dims, intermediate_size: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=intermediate_size or dims.ffn_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_heads,
        max_position_embeddings=dims.max_positions,
        tie_word_embeddings=True,  # as hf_extras' causal LMs, so parameter counts compare
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def _build_llama(dims: Dims):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(_llama_config(dims), attn_implementation="sdpa")


def llama_non_embedding_params(dims: Dims) -> int:
    """Non-embedding parameters of the baseline Llama of these dims (counted on the meta device: no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_llama_config(dims))
    return count_parameters(model)["params_non_embedding"]


def _matched_ffn_size(build_with: Callable[[int], torch.nn.Module], target: int, start: int) -> int:
    """The FFN width (a multiple of 8) whose model has the non-embedding parameter count nearest `target`.

    Parameters grow linearly in the FFN width, so two builds give the slope (on the meta device: no memory).
    """
    with torch.device("meta"):
        at_start = count_parameters(build_with(start))["params_non_embedding"]
        slope = (at_start - count_parameters(build_with(start - 8))["params_non_embedding"]) / 8
    if slope <= 0:
        return start
    return max(8, int(round((start + (target - at_start) / slope) / 8)) * 8)


def _build_hfx(
    config_name: str, model_name: str, match_llama: bool = True, **overrides
) -> Callable[[Dims], torch.nn.Module]:
    """Builder of an hf_extras causal LM of the suite's width, depth and heads.

    `match_llama`: set the FFN width so the model has as many non-embedding parameters as the baseline Llama (RetNet's
    value/gate projections are twice as wide as attention's, so at Llama's FFN width it would have ~1.3x the
    parameters and the compute; the RetNet paper compares at equal parameters the same way).
    """

    def build(dims: Dims):
        import hf_extras

        config_class, model_class = getattr(hf_extras, config_name), getattr(hf_extras, model_name)

        def build_with(ffn: int):
            return model_class(config_class(**{**dims.hfx_kwargs(), "intermediate_size": ffn}, **overrides))

        ffn = dims.ffn_size
        if match_llama:
            ffn = _matched_ffn_size(build_with, llama_non_embedding_params(dims), ffn)
        return build_with(ffn)

    return build


def _build_transformers_mamba(dims: Dims):
    """transformers' MambaForCausalLM of the suite's width and depth (expand 2, state 16): its CPU path, no kernels."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        num_hidden_layers=dims.num_hidden_layers,
        state_size=16,
        expand=2,
        conv_kernel=4,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return MambaForCausalLM(config)


def _build_hfx_mamba(dims: Dims):
    """hf_extras' Mamba with transformers' Mamba config (same parameters, same layout)."""
    import hf_extras

    config = hf_extras.HfxMambaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        num_hidden_layers=dims.num_hidden_layers,
        state_size=16,
        expand=2,
        conv_kernel=4,
        forward_mode="auto",
    )
    return hf_extras.HfxMambaForCausalLM(config)


def _mamba2_sizes(dims: Dims) -> dict:
    """Mamba-2's published shape at the suite's width: expand 2, head_dim 64 (at least one head), state 128, 1 group."""
    return dict(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_heads=max(1, 2 * dims.hidden_size // 64),
        state_size=128,
        n_groups=1,
        expand=2,
        conv_kernel=4,
    )


def _build_hfx_mamba2(dims: Dims):
    """hf_extras' Mamba-2 (SSD on `retention_ops`), the same config as transformers' Mamba2 below."""
    import hf_extras

    return hf_extras.HfxMamba2ForCausalLM(hf_extras.HfxMamba2Config(**_mamba2_sizes(dims), forward_mode="auto"))


def _build_transformers_mamba2(dims: Dims):
    """transformers' Mamba2ForCausalLM of the same config: its CPU path (chunked SSD in PyTorch, no kernels)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    sizes = _mamba2_sizes(dims)
    config = Mamba2Config(
        **sizes,
        head_dim=2 * dims.hidden_size // sizes["num_heads"],
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Mamba2ForCausalLM(config)


register_model(
    ModelSpec(
        "llama",
        "Llama",
        _build_llama,
        "transformers LlamaForCausalLM, SDPA attention, SwiGLU FFN 8/3 x width, tied embeddings (the baseline)",
    )
)

register_model(
    ModelSpec(
        "retnet",
        "RetNet",
        _build_hfx("RetNetConfig", "RetNetForCausalLM", forward_mode="auto"),
        "hf_extras RetNet, forward_mode='auto' (parallel up to 128 tokens, chunkwise above), FFN width matched to "
        "Llama's parameter count",
    )
)

register_model(
    ModelSpec(
        "gla",
        "GLA",
        _build_hfx("GatedRetentionConfig", "GatedRetentionForCausalLM", gate="key", forward_mode="auto"),
        "hf_extras gated retention, gate='key' (GLA: one decay per key channel), FFN matched to Llama's parameters",
    )
)

register_model(
    ModelSpec(
        "gated_retnet",
        "Gated RetNet",
        _build_hfx("GatedRetentionConfig", "GatedRetentionForCausalLM", gate="head", forward_mode="auto"),
        "hf_extras gated retention, gate='head' (one decay per head and token), FFN matched to Llama's parameters",
    )
)

register_model(
    ModelSpec(
        "gated_deltanet",
        "Gated DeltaNet",
        _build_hfx("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", gate="head", forward_mode="auto"),
        "hf_extras Gated DeltaNet (delta rule, per-head decay, short conv, gated output norm), FFN matched to "
        "Llama's parameters",
    )
)

# linear mixers with LoLCATs' softmax window (`attention_window`): what a linearized model runs
WINDOW = 64
register_model(
    ModelSpec(
        "gated_retnet_window",
        "Gated RetNet + window 64",
        _build_hfx(
            "GatedRetentionConfig",
            "GatedRetentionForCausalLM",
            gate="head",
            use_rotary=True,
            attention_window=WINDOW,
            forward_mode="auto",
        ),
        f"hf_extras gated retention, gate='head', rotary, plus exact softmax over the last {WINDOW} tokens in every "
        "mixer (attention_window), FFN matched to Llama's parameters",
    )
)
register_model(
    ModelSpec(
        "gated_deltanet_window",
        "Gated DeltaNet + window 64",
        _build_hfx(
            "GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", gate="head", attention_window=WINDOW, forward_mode="auto"
        ),
        f"hf_extras Gated DeltaNet plus exact softmax over the last {WINDOW} tokens in every mixer "
        "(attention_window, rotary q/k), FFN matched to Llama's parameters",
    )
)

register_model(
    ModelSpec(
        "dyt",
        "DyT",
        _build_hfx("DyTConfig", "DyTForCausalLM", attn_implementation="sdpa"),
        "hf_extras DyT transformer (Llama layout with DynamicTanh instead of RMSNorm, SDPA)",
    )
)

register_model(
    ModelSpec(
        "hfx_mamba",
        "Mamba (hf_extras)",
        _build_hfx_mamba,
        "hf_extras Mamba (no FFN, expand 2, state 16: about half of Llama's parameters at equal width and depth)",
    )
)

register_model(
    ModelSpec(
        "hf_mamba",
        "Mamba (transformers)",
        _build_transformers_mamba,
        "transformers MambaForCausalLM, same config as hf_extras' Mamba; on CPU its per-token Python loop (no kernels)",
        max_train_len=512,
        max_decode_context=8192,
    )
)

register_model(
    ModelSpec(
        "hfx_mamba2",
        "Mamba-2 (hf_extras)",
        _build_hfx_mamba2,
        "hf_extras Mamba-2 (SSD as decayed linear attention; no FFN, expand 2, head_dim 64, state 128, 1 group)",
    )
)
register_model(
    ModelSpec(
        "hf_mamba2",
        "Mamba-2 (transformers)",
        _build_transformers_mamba2,
        "transformers Mamba2ForCausalLM, same config as hf_extras' Mamba-2; on CPU its chunked PyTorch SSD",
    )
)


def _build_hybrid(config_name: str, model_name: str, **overrides) -> Callable[[Dims], torch.nn.Module]:
    """Builder of a 3:1 hybrid (every 4th block softmax attention, Qwen3-Next style) of an hf_extras family, FFN
    matched to Llama's parameters as for the pure families."""

    def build(dims: Dims):
        from hf_extras.models.hybrid import hybrid_schedule

        layer_types = hybrid_schedule("3:1", dims.num_hidden_layers)
        return _build_hfx(config_name, model_name, layer_types=layer_types, **overrides)(dims)

    return build


for _name, _label, _config, _model, _options in (
    ("retnet_hybrid", "RetNet 3:1 hybrid", "RetNetConfig", "RetNetForCausalLM", {}),
    ("gla_hybrid", "GLA 3:1 hybrid", "GatedRetentionConfig", "GatedRetentionForCausalLM", {"gate": "key"}),
    (
        "gated_deltanet_hybrid",
        "Gated DeltaNet 3:1 hybrid",
        "GatedDeltaNetConfig",
        "GatedDeltaNetForCausalLM",
        {"gate": "head"},
    ),
):
    register_model(
        ModelSpec(
            _name,
            _label,
            _build_hybrid(_config, _model, forward_mode="auto", **_options),
            f"hf_extras {_label}: layer_types = hybrid_schedule('3:1', depth), every 4th block softmax attention "
            "(eager, rotary, KV cache), FFN matched to Llama's parameters",
        )
    )

BASELINE = "llama"
DEFAULT_FAMILIES: tuple[str, ...] = (
    "llama",
    "retnet",
    "gla",
    "gated_retnet",
    "gated_deltanet",
    "dyt",
    "hfx_mamba",
    "hf_mamba",
)


# every sequence family at one fixed size, as (config class, causal-LM class, options) of the `hf_extras` namespace
FAMILY_DIMS: dict[str, Any] = dict(vocab_size=264, hidden_size=256, num_hidden_layers=4, num_heads=4, chunk_size=64)
FAMILY_VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "retnet": ("RetNetConfig", "RetNetForCausalLM", {}),
    "gla": ("GatedRetentionConfig", "GatedRetentionForCausalLM", {"gate": "key", "use_short_conv": True}),
    "gated_retnet": ("GatedRetentionConfig", "GatedRetentionForCausalLM", {"gate": "head", "use_rotary": True}),
    "linear_attention": ("GatedRetentionConfig", "GatedRetentionForCausalLM", {"gate": "none", "feature_map": "elu"}),
    "dyt": ("DyTConfig", "DyTForCausalLM", {}),
    "mamba": ("HfxMambaConfig", "HfxMambaForCausalLM", {"state_size": 8}),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", {"gate": "head"}),
    "mamba2": ("HfxMamba2Config", "HfxMamba2ForCausalLM", {"state_size": 16, "n_groups": 1}),
}
FAMILY_NAMES: list[str] = list(FAMILY_VARIANTS)


def family_causal_lm(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The causal LM of family variant `name` (`FAMILY_VARIANTS`) at `FAMILY_DIMS`, seeded; `overrides` set config
    fields."""
    import hf_extras

    if name not in FAMILY_VARIANTS:
        raise ValueError(f"unknown family {name!r}; known: {FAMILY_NAMES}")
    config_name, model_name, options = FAMILY_VARIANTS[name]
    config = getattr(hf_extras, config_name)(**{**FAMILY_DIMS, **options, **overrides})
    torch.manual_seed(seed)
    return getattr(hf_extras, model_name)(config)
