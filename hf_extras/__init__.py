"""hf_extras: post-Transformer architectures as first-class Hugging Face transformers models.

`import hf_extras` registers every family with the Auto classes, their default PEFT target modules and the
question-answering pipeline. It loads nothing of the data/training stack (`datasets`, task recipes, the CLI, the
benchmark harness): `tests/test_imports.py` checks it.
"""

from .dyt import convert_norms_to_dyt, load_dyt_model
from .errors import ConfigError
from .models.cache import RecurrentCache
from .models.configuration_dyt import DyTConfig
from .models.configuration_gated_deltanet import GatedDeltaNetConfig
from .models.configuration_gated_retention import GatedRetentionConfig
from .models.configuration_mamba import HfxMambaConfig
from .models.configuration_mamba2 import HfxMamba2Config
from .models.configuration_mlp_mixer import MlpMixerConfig
from .models.configuration_retnet import RetNetConfig
from .models.image_processing_mlp_mixer import MlpMixerImageProcessor
from .models.modeling_dyt import (
    DyTForCausalLM,
    DyTForConditionalGeneration,
    DyTForMaskedLM,
    DyTForQuestionAnswering,
    DyTForSequenceClassification,
    DyTForTokenClassification,
    DyTModel,
)
from .models.modeling_gated_deltanet import (
    GatedDeltaNetForCausalLM,
    GatedDeltaNetForConditionalGeneration,
    GatedDeltaNetForMaskedLM,
    GatedDeltaNetForQuestionAnswering,
    GatedDeltaNetForSequenceClassification,
    GatedDeltaNetForTokenClassification,
    GatedDeltaNetModel,
)
from .models.modeling_gated_retention import (
    GatedRetentionForCausalLM,
    GatedRetentionForConditionalGeneration,
    GatedRetentionForMaskedLM,
    GatedRetentionForQuestionAnswering,
    GatedRetentionForSequenceClassification,
    GatedRetentionForTokenClassification,
    GatedRetentionModel,
)
from .models.modeling_mamba import (
    HfxMambaForCausalLM,
    HfxMambaForConditionalGeneration,
    HfxMambaForMaskedLM,
    HfxMambaForQuestionAnswering,
    HfxMambaForSequenceClassification,
    HfxMambaForTokenClassification,
    HfxMambaModel,
)
from .models.modeling_mamba2 import (
    HfxMamba2ForCausalLM,
    HfxMamba2ForConditionalGeneration,
    HfxMamba2ForMaskedLM,
    HfxMamba2ForQuestionAnswering,
    HfxMamba2ForSequenceClassification,
    HfxMamba2ForTokenClassification,
    HfxMamba2Model,
)
from .models.modeling_mlp_mixer import (
    MlpMixerForCausalLM,
    MlpMixerForImageClassification,
    MlpMixerForSequenceClassification,
    MlpMixerForTokenClassification,
    MlpMixerModel,
)
from .models.modeling_retnet import (
    RetNetForCausalLM,
    RetNetForConditionalGeneration,
    RetNetForMaskedLM,
    RetNetForQuestionAnswering,
    RetNetForSequenceClassification,
    RetNetForTokenClassification,
    RetNetModel,
)
from .models.norms import DyT
from .registration import register_all

register_all()

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
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
    "HfxMamba2Config",
    "HfxMamba2Model",
    "HfxMamba2ForCausalLM",
    "HfxMamba2ForMaskedLM",
    "HfxMamba2ForSequenceClassification",
    "HfxMamba2ForTokenClassification",
    "HfxMamba2ForQuestionAnswering",
    "HfxMamba2ForConditionalGeneration",
    "GatedDeltaNetConfig",
    "GatedDeltaNetModel",
    "GatedDeltaNetForCausalLM",
    "GatedDeltaNetForMaskedLM",
    "GatedDeltaNetForSequenceClassification",
    "GatedDeltaNetForTokenClassification",
    "GatedDeltaNetForQuestionAnswering",
    "GatedDeltaNetForConditionalGeneration",
]
