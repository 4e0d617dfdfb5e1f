"""RetNet: multi-scale retention on the shared backbone, with every task head."""

from __future__ import annotations

import torch

from .backbone import SequenceBackbone, SharedPreTrainedModel, register_family
from .configuration_retnet import RetNetConfig
from .heads import (
    ForCausalLMHead,
    ForMaskedLMHead,
    ForQuestionAnsweringHead,
    ForSequenceClassificationHead,
    ForTokenClassificationHead,
)
from .retention_mixer import RetentionMixer
from .seq2seq import ForConditionalGenerationHead


def retnet_log_decay(num_heads: int, device=None) -> torch.Tensor:
    """Per-head log decay `log(1 - 2^(-5-h))`: head 0 forgets fastest (gamma = 0.969), later heads keep longer."""
    exponents = -5.0 - torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log1p(-torch.pow(2.0, exponents))


class MultiScaleRetention(RetentionMixer):
    """Multi-scale retention: rotary q/k, fixed per-head decay, per-head RMS group norm, swish gate."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__(config, layer_idx)

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return retnet_log_decay(self.num_heads, hidden_states.device)


class RetNetPreTrainedModel(SharedPreTrainedModel):
    config_class = RetNetConfig
    config: RetNetConfig


class RetNetModel(RetNetPreTrainedModel, SequenceBackbone):
    """The bare RetNet backbone: embeddings, retention blocks, final norm."""

    mixer_class = MultiScaleRetention


class RetNetForCausalLM(RetNetPreTrainedModel, ForCausalLMHead):
    backbone_class = RetNetModel


class RetNetForMaskedLM(RetNetPreTrainedModel, ForMaskedLMHead):
    backbone_class = RetNetModel


class RetNetForSequenceClassification(RetNetPreTrainedModel, ForSequenceClassificationHead):
    backbone_class = RetNetModel


class RetNetForTokenClassification(RetNetPreTrainedModel, ForTokenClassificationHead):
    backbone_class = RetNetModel


class RetNetForQuestionAnswering(RetNetPreTrainedModel, ForQuestionAnsweringHead):
    backbone_class = RetNetModel


class RetNetForConditionalGeneration(ForConditionalGenerationHead, RetNetPreTrainedModel):
    """Seq2seq LM: bidirectional encoder and causal decoder stacks of RetNetModel, with cross-attention."""

    backbone_class = RetNetModel


AUTO_CLASSES = {
    "AutoModel": RetNetModel,
    "AutoModelForCausalLM": RetNetForCausalLM,
    "AutoModelForMaskedLM": RetNetForMaskedLM,
    "AutoModelForSequenceClassification": RetNetForSequenceClassification,
    "AutoModelForTokenClassification": RetNetForTokenClassification,
    "AutoModelForQuestionAnswering": RetNetForQuestionAnswering,
    "AutoModelForSeq2SeqLM": RetNetForConditionalGeneration,
}
register_family(RetNetConfig, AUTO_CLASSES)

__all__ = [cls.__name__ for cls in AUTO_CLASSES.values()] + ["RetNetPreTrainedModel"]
