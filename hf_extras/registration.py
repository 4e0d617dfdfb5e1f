"""Registers every family with transformers' Auto classes (run once by `import hf_extras`)."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .models import modeling_dyt, modeling_gated_retention, modeling_retnet

AUTO_FACTORIES = {
    "AutoModel": AutoModel,
    "AutoModelForCausalLM": AutoModelForCausalLM,
    "AutoModelForMaskedLM": AutoModelForMaskedLM,
    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
    "AutoModelForTokenClassification": AutoModelForTokenClassification,
    "AutoModelForQuestionAnswering": AutoModelForQuestionAnswering,
}

FAMILY_MODULES = [modeling_retnet, modeling_gated_retention, modeling_dyt]


def register_all() -> None:
    """Map each family's `model_type` to its config and each head to its Auto class (idempotent)."""
    for module in FAMILY_MODULES:
        classes = module.AUTO_CLASSES
        config_class = classes["AutoModel"].config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_class in classes.items():
            AUTO_FACTORIES[auto_name].register(config_class, model_class, exist_ok=True)
