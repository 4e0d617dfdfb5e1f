"""hf_extras: post-Transformer architectures as first-class Hugging Face transformers models.

`import hf_extras` registers every family with the Auto classes.
"""

from .models.configuration_retnet import RetNetConfig
from .models.modeling_retnet import (
    RetNetForConditionalGeneration,
    RetNetForCausalLM,
    RetNetForMaskedLM,
    RetNetForQuestionAnswering,
    RetNetForSequenceClassification,
    RetNetForTokenClassification,
    RetNetModel,
)
from .models.configuration_gated_retention import GatedRetentionConfig
from .models.modeling_gated_retention import (
    GatedRetentionForConditionalGeneration,
    GatedRetentionForCausalLM,
    GatedRetentionForMaskedLM,
    GatedRetentionForQuestionAnswering,
    GatedRetentionForSequenceClassification,
    GatedRetentionForTokenClassification,
    GatedRetentionModel,
)
from .models.configuration_dyt import DyTConfig
from .models.modeling_dyt import (
    DyTForConditionalGeneration,
    DyTForCausalLM,
    DyTForMaskedLM,
    DyTForQuestionAnswering,
    DyTForSequenceClassification,
    DyTForTokenClassification,
    DyTModel,
)
from .models.configuration_mlp_mixer import MlpMixerConfig
from .models.image_processing_mlp_mixer import MlpMixerImageProcessor
from .models.modeling_mlp_mixer import (
    MlpMixerForCausalLM,
    MlpMixerForImageClassification,
    MlpMixerForSequenceClassification,
    MlpMixerForTokenClassification,
    MlpMixerModel,
)
from .models.configuration_mamba import HfxMambaConfig
from .models.modeling_mamba import (
    HfxMambaForConditionalGeneration,
    HfxMambaForCausalLM,
    HfxMambaForMaskedLM,
    HfxMambaForQuestionAnswering,
    HfxMambaForSequenceClassification,
    HfxMambaForTokenClassification,
    HfxMambaModel,
)
from .models.cache import RecurrentCache
from .models.norms import DyT
from .registration import register_all
from .dyt import convert_norms_to_dyt, load_dyt_model

register_all()

__version__ = "0.1.0"

__all__ = [
    "DyT",
    "RecurrentCache",
    "RetNetConfig",
    "RetNetModel",
    "RetNetForCausalLM",
    "RetNetForMaskedLM",
    "RetNetForSequenceClassification",
    "RetNetForTokenClassification",
    "RetNetForQuestionAnswering",
    "RetNetForConditionalGeneration",
    "GatedRetentionConfig",
    "GatedRetentionModel",
    "GatedRetentionForCausalLM",
    "GatedRetentionForMaskedLM",
    "GatedRetentionForSequenceClassification",
    "GatedRetentionForTokenClassification",
    "GatedRetentionForQuestionAnswering",
    "GatedRetentionForConditionalGeneration",
    "DyTConfig",
    "DyTModel",
    "DyTForCausalLM",
    "DyTForMaskedLM",
    "DyTForSequenceClassification",
    "DyTForTokenClassification",
    "DyTForQuestionAnswering",
    "DyTForConditionalGeneration",
    "convert_norms_to_dyt",
    "load_dyt_model",
    "MlpMixerConfig",
    "MlpMixerImageProcessor",
    "MlpMixerModel",
    "MlpMixerForImageClassification",
    "MlpMixerForCausalLM",
    "MlpMixerForSequenceClassification",
    "MlpMixerForTokenClassification",
    "HfxMambaConfig",
    "HfxMambaModel",
    "HfxMambaForCausalLM",
    "HfxMambaForMaskedLM",
    "HfxMambaForSequenceClassification",
    "HfxMambaForTokenClassification",
    "HfxMambaForQuestionAnswering",
    "HfxMambaForConditionalGeneration",
]
