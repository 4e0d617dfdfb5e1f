"""The families under test, with tiny configs; every generic test is parametrised over this list."""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

import hf_extras


@dataclass
class Family:
    name: str
    config_class: type
    prefix: str  # class-name prefix, e.g. "RetNet"
    tiny: dict = field(default_factory=dict)
    recurrent: bool = True  # fixed-size state (vs. a growing KV cache)
    # a float64 run is float64 throughout, but for per-token float32 parts (gates) that packing cannot change, so
    # packed and alone agree to float64 rounding
    float64_exact: bool = False

    def config(self, **overrides):
        kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8)
        kwargs.update(self.tiny)
        kwargs.update(overrides)
        return self.config_class(**kwargs)

    def cls(self, head: str):
        return getattr(hf_extras, f"{self.prefix}{head}")


HYBRID = ["linear_attention", "full_attention"]
SLIDING_HYBRID = ["sliding_attention", "linear_attention"]

FAMILIES = [
    Family("retnet", hf_extras.RetNetConfig, "RetNet", float64_exact=True),
    Family(
        "gla",
        hf_extras.GatedRetentionConfig,
        "GatedRetention",
        dict(gate="key", use_short_conv=True),
        float64_exact=True,
    ),
    Family(
        "gated_retnet",
        hf_extras.GatedRetentionConfig,
        "GatedRetention",
        dict(gate="head", use_rotary=True),
        float64_exact=True,
    ),
    Family(
        "linear_attention",
        hf_extras.GatedRetentionConfig,
        "GatedRetention",
        dict(gate="none", feature_map="elu"),
        float64_exact=True,
    ),
    Family("dyt", hf_extras.DyTConfig, "DyT", recurrent=False),
    Family("mamba", hf_extras.HfxMambaConfig, "HfxMamba", dict(state_size=8, num_heads=1)),
    # gated retention with a softmax window in every mixer (LoLCATs-style linearizing target), shorter than the inputs
    Family(
        "gated_retnet_window",
        hf_extras.GatedRetentionConfig,
        "GatedRetention",
        dict(gate="head", use_rotary=True, attention_window=4),
        float64_exact=True,
    ),
    # hybrids (issue 20): one softmax attention block among the family's own; kept before the last two entries,
    # which some tests pick by position
    Family("retnet_hybrid", hf_extras.RetNetConfig, "RetNet", dict(layer_types=HYBRID), recurrent=False),
    Family(
        "mamba_hybrid",
        hf_extras.HfxMambaConfig,
        "HfxMamba",
        dict(state_size=8, num_heads=1, layer_types=SLIDING_HYBRID, sliding_window=4),
        recurrent=False,
    ),
    Family("mamba2", hf_extras.HfxMamba2Config, "HfxMamba2", dict(state_size=8, num_heads=4, n_groups=2)),
    Family(
        "gated_deltanet_hybrid",
        hf_extras.GatedDeltaNetConfig,
        "GatedDeltaNet",
        dict(gate="head", layer_types=HYBRID),
        recurrent=False,
    ),
    Family("gated_deltanet", hf_extras.GatedDeltaNetConfig, "GatedDeltaNet", dict(gate="head")),
    Family(
        "gated_deltanet_window",
        hf_extras.GatedDeltaNetConfig,
        "GatedDeltaNet",
        dict(gate="head", num_key_heads=1, attention_window=4),
    ),
    Family("deltanet", hf_extras.GatedDeltaNetConfig, "GatedDeltaNet", dict(gate="none", num_key_heads=1)),
]

HEADS = {
    "Model": transformers.AutoModel,
    "ForCausalLM": transformers.AutoModelForCausalLM,
    "ForMaskedLM": transformers.AutoModelForMaskedLM,
    "ForSequenceClassification": transformers.AutoModelForSequenceClassification,
    "ForTokenClassification": transformers.AutoModelForTokenClassification,
    "ForQuestionAnswering": transformers.AutoModelForQuestionAnswering,
}

# heads that need a bidirectional backbone, and heads that refuse one
BIDIRECTIONAL_ONLY = {"ForMaskedLM"}
CAUSAL_ONLY = {"ForCausalLM"}


def head_config(family: Family, head: str, **overrides):
    bidirectional = head in BIDIRECTIONAL_ONLY or (head not in CAUSAL_ONLY and overrides.pop("bidirectional", False))
    return family.config(bidirectional=bidirectional, num_labels=3, **overrides)


def assert_finite_in_float32_and_bf16(model, ids):
    """One forward + backward with `labels=ids` in float32 and under CPU bf16 autocast: outputs, loss and every
    gradient finite. Returns the two logits tensors (float32 run, bf16 run) for closeness checks."""
    import torch

    def run():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        return out.logits

    logits32 = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16 = run()
    return logits32, logits16
