"""Map transformers' `Qwen3NextGatedDeltaNet` layer weights into hf_extras' `GatedDeltaNetMixer` and back.

Qwen3-Next fuses its projections and interleaves them per key head (each key head g serves `r = Hv / Hk` value heads)::

    Qwen3NextGatedDeltaNet                          GatedDeltaNetMixer
    in_proj_qkvz.weight  rows, per key head g:      q_proj.weight  (Hk*Dk rows)
        [q_g (Dk) | k_g (Dk) | v_g (r*Dv) | z_g (r*Dv)]  k_proj.weight  (Hk*Dk)
                                                    v_proj.weight  (Hv*Dv), g_proj.weight (Hv*Dv; the z gate)
    in_proj_ba.weight    rows, per key head g:      b_proj.weight  (Hv), a_proj.weight (Hv)
        [b_g (r) | a_g (r)]
    conv1d.weight        channels [q | k | v]        conv1d.weight  (same order, same shape)
    A_log, dt_bias                                  A_log, dt_bias
    norm.weight          (Dv, RMSNormGated)         o_norm.weight
    out_proj.weight                                 o_proj.weight

The computations match: L2-normalised q/k (eps 1e-6), q scaled by `Dk ** -0.5`, `beta = sigmoid(b)`,
`g = -exp(A_log) * softplus(a + dt_bias)`, the per-head RMS norm times `silu(z)`. Whole Qwen3-Next checkpoints mix
these layers with gated softmax attention and MoE, which an all-linear hf_extras model does not have; the converter
works per layer (e.g. to initialise a Gated DeltaNet from Qwen3-Next's linear layers, or to check numerics).

    >>> from hf_extras.convert import gated_deltanet_config_from_qwen3_next, qwen3_next_layer_to_hfx
    >>> config = gated_deltanet_config_from_qwen3_next(qwen_config, num_hidden_layers=4)
    >>> mixer.load_state_dict(qwen3_next_layer_to_hfx(qwen_layer.linear_attn.state_dict(), config))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.configuration_gated_deltanet import GatedDeltaNetConfig

__all__ = ["gated_deltanet_config_from_qwen3_next", "qwen3_next_layer_to_hfx", "hfx_layer_to_qwen3_next"]


def gated_deltanet_config_from_qwen3_next(qwen_config, **overrides) -> GatedDeltaNetConfig:
    """A `GatedDeltaNetConfig` whose mixers have the shapes of `qwen_config`'s linear-attention layers.

    Vocabulary, depth and FFN come from `qwen_config` too (its dense `intermediate_size`); `overrides` win.
    """
    values = dict(
        vocab_size=qwen_config.vocab_size,
        hidden_size=qwen_config.hidden_size,
        num_hidden_layers=qwen_config.num_hidden_layers,
        num_heads=qwen_config.linear_num_value_heads,
        num_key_heads=qwen_config.linear_num_key_heads,
        key_head_dim=qwen_config.linear_key_head_dim,
        value_head_dim=qwen_config.linear_value_head_dim,
        conv_size=qwen_config.linear_conv_kernel_dim,
        use_short_conv=True,
        use_output_gate=True,
        gate="head",
        norm_eps=float(qwen_config.rms_norm_eps),
        intermediate_size=qwen_config.intermediate_size,
        hidden_act=qwen_config.hidden_act,
    )
    values.update(overrides)
    return GatedDeltaNetConfig(**values)


def _shapes(config: GatedDeltaNetConfig) -> tuple[int, int, int, int, int]:
    if config.gate != "head" or not config.use_output_gate or not config.use_short_conv:
        raise ValueError(
            "Qwen3-Next's layer has a decay, an output gate and a short conv: the config needs gate='head', "
            f"use_output_gate=True and use_short_conv=True (got gate={config.gate!r}, "
            f"use_output_gate={config.use_output_gate}, use_short_conv={config.use_short_conv})."
        )
    if config.allow_neg_eigval or config.output_gate_activation != "silu":
        raise ValueError(
            "Qwen3-Next's layer has beta = sigmoid(b) and a SiLU output gate: the config needs allow_neg_eigval=False "
            f"and output_gate_activation='silu' (got {config.allow_neg_eigval}, {config.output_gate_activation!r})."
        )
    Hk, Hv = config.num_key_heads, config.num_heads
    return Hk, Hv, Hv // Hk, config.key_head_dim, config.value_head_dim


def qwen3_next_layer_to_hfx(state_dict: Mapping[str, torch.Tensor], config: GatedDeltaNetConfig) -> dict:
    """A `Qwen3NextGatedDeltaNet` state dict (keys without a prefix) as a `GatedDeltaNetMixer` state dict."""
    Hk, Hv, r, Dk, Dv = _shapes(config)
    missing = {"in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "A_log", "dt_bias", "norm.weight"}
    missing |= {"out_proj.weight"}
    missing -= set(state_dict)
    if missing:
        raise KeyError(f"not a Qwen3NextGatedDeltaNet state dict: missing {sorted(missing)}")
    qkvz = state_dict["in_proj_qkvz.weight"]
    hidden = qkvz.shape[-1]
    if qkvz.shape[0] != Hk * (2 * Dk + 2 * r * Dv):
        raise ValueError(
            f"in_proj_qkvz has {qkvz.shape[0]} rows; the config expects {Hk * (2 * Dk + 2 * r * Dv)} "
            f"(num_key_heads={Hk}, num_heads={Hv}, key_head_dim={Dk}, value_head_dim={Dv}): build the config with "
            "gated_deltanet_config_from_qwen3_next."
        )
    q, k, v, z = qkvz.view(Hk, 2 * Dk + 2 * r * Dv, hidden).split([Dk, Dk, r * Dv, r * Dv], dim=1)
    b, a = state_dict["in_proj_ba.weight"].view(Hk, 2 * r, hidden).split([r, r], dim=1)
    return {
        "q_proj.weight": q.reshape(Hk * Dk, hidden).clone(),
        "k_proj.weight": k.reshape(Hk * Dk, hidden).clone(),
        "v_proj.weight": v.reshape(Hv * Dv, hidden).clone(),
        "g_proj.weight": z.reshape(Hv * Dv, hidden).clone(),
        "b_proj.weight": b.reshape(Hv, hidden).clone(),
        "a_proj.weight": a.reshape(Hv, hidden).clone(),
        "conv1d.weight": state_dict["conv1d.weight"].clone(),
        "A_log": state_dict["A_log"].clone(),
        "dt_bias": state_dict["dt_bias"].clone(),
        "o_norm.weight": state_dict["norm.weight"].clone(),
        "o_proj.weight": state_dict["out_proj.weight"].clone(),
    }


def hfx_layer_to_qwen3_next(state_dict: Mapping[str, torch.Tensor], config: GatedDeltaNetConfig) -> dict:
    """The inverse of `qwen3_next_layer_to_hfx`: a `GatedDeltaNetMixer` state dict in Qwen3-Next's layout."""
    Hk, Hv, r, Dk, Dv = _shapes(config)
    hidden = state_dict["q_proj.weight"].shape[-1]
    per_head = [
        state_dict["q_proj.weight"].view(Hk, Dk, hidden),
        state_dict["k_proj.weight"].view(Hk, Dk, hidden),
        state_dict["v_proj.weight"].view(Hk, r * Dv, hidden),
        state_dict["g_proj.weight"].view(Hk, r * Dv, hidden),
    ]
    ba = [state_dict["b_proj.weight"].view(Hk, r, hidden), state_dict["a_proj.weight"].view(Hk, r, hidden)]
    return {
        "in_proj_qkvz.weight": torch.cat(per_head, dim=1).reshape(-1, hidden),
        "in_proj_ba.weight": torch.cat(ba, dim=1).reshape(-1, hidden),
        "conv1d.weight": state_dict["conv1d.weight"].clone(),
        "A_log": state_dict["A_log"].clone(),
        "dt_bias": state_dict["dt_bias"].clone(),
        "norm.weight": state_dict["o_norm.weight"].clone(),
        "out_proj.weight": state_dict["o_proj.weight"].clone(),
    }
