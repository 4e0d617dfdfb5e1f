"""Registers every family with transformers' Auto classes (run once by `import hf_extras`)."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .models import (
    modeling_dyt,
    modeling_gated_deltanet,
    modeling_gated_retention,
    modeling_mamba,
    modeling_mamba2,
    modeling_mlp_mixer,
    modeling_retnet,
)
from .models.configuration_mlp_mixer import MlpMixerConfig
from .models.image_processing_mlp_mixer import MlpMixerImageProcessor
from .peft_maps import register_peft_target_modules
from .pipelines import register_qa_pipeline

AUTO_FACTORIES = {
    "AutoModel": AutoModel,
    "AutoModelForCausalLM": AutoModelForCausalLM,
    "AutoModelForMaskedLM": AutoModelForMaskedLM,
    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
    "AutoModelForTokenClassification": AutoModelForTokenClassification,
    "AutoModelForQuestionAnswering": AutoModelForQuestionAnswering,
    "AutoModelForImageClassification": AutoModelForImageClassification,
    "AutoModelForSeq2SeqLM": AutoModelForSeq2SeqLM,
}

FAMILY_MODULES = [
    modeling_retnet,
    modeling_gated_retention,
    modeling_dyt,
    modeling_mlp_mixer,
    modeling_mamba,
    modeling_mamba2,
    modeling_gated_deltanet,
]

# config class -> PIL-backend image processor (registered with AutoImageProcessor)
IMAGE_PROCESSORS = {MlpMixerConfig: MlpMixerImageProcessor}


def register_all() -> None:
    """Map each family's `model_type` to its config and each head to its Auto class, and register the families'
    default PEFT target modules (idempotent)."""
    for module in FAMILY_MODULES:
        classes = module.AUTO_CLASSES
        config_class = classes["AutoModel"].config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_class in classes.items():
            AUTO_FACTORIES[auto_name].register(config_class, model_class, exist_ok=True)
    for config_class, processor_class in IMAGE_PROCESSORS.items():
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": processor_class}, exist_ok=True)
    register_qa_pipeline()  # transformers 5 dropped pipeline("question-answering")
    register_peft_target_modules()
