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


def register_no_video_processor(config_class) -> None:
    """Declare that an image family has no video processor (a local answer, so nothing asks).

    Without it, transformers 5.25's `pipeline()` guesses a video processor from the image processor's `auto_map`
    (`...ImageProcessor` -> `...VideoProcessor`) and, finding no local class, stops at "Do you wish to run the custom
    code? [y/N]" for a folder hf_extras serves. The pipeline uses the module's class even where the top-level
    `transformers.AutoVideoProcessor` is a torchvision placeholder, so register there.
    """
    try:
        from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    except ImportError:  # a transformers without video processors never asks
        return
    AutoVideoProcessor.register(config_class, video_processor_classes={}, exist_ok=True)


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
        register_no_video_processor(config_class)
    register_qa_pipeline()  # transformers 5 dropped pipeline("question-answering")
    register_peft_target_modules()
