"""Gated retention: GLA (per-key-channel gate), gated RetNet (per-head gate) and plain linear attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import SequenceBackbone, SharedPreTrainedModel, register_family
from .configuration_gated_retention import GatedRetentionConfig
from .heads import (
    ForCausalLMHead,
    ForMaskedLMHead,
    ForQuestionAnsweringHead,
    ForSequenceClassificationHead,
    ForTokenClassificationHead,
)
from .retention_mixer import RetentionMixer
from .seq2seq import ForConditionalGenerationHead


class GatedRetention(RetentionMixer):
    """Retention whose decay comes from the input: `log a_t = logsigmoid(gate(x_t)) / tau`."""

    def __init__(self, config: GatedRetentionConfig, layer_idx: int):
        super().__init__(
            config,
            layer_idx,
            conv_size=config.conv_size if config.use_short_conv else 0,
            feature_map=config.feature_map,
        )
        self.gate = config.gate
        self.tau = config.gate_logit_normalizer
        if self.gate == "head":
            self.gk_proj = nn.Linear(config.hidden_size, self.num_heads, bias=True)
        elif self.gate == "key":
            self.gk_proj = nn.Sequential(
                nn.Linear(config.hidden_size, config.gate_low_rank_dim, bias=False),
                nn.Linear(config.gate_low_rank_dim, self.num_heads * self.head_dim, bias=True),
            )
        self.clamp_min = config.gate_clamp_min

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.gate == "none":
            return None
        batch, seq_len, _ = hidden_states.shape
        log_a = F.logsigmoid(self.gk_proj(hidden_states).float()) / self.tau
        if self.clamp_min is not None:  # fla GLA's clamp_min: decays never below exp(clamp_min)
            log_a = log_a.clamp_min(self.clamp_min)
        if self.gate == "head":
            return log_a.transpose(1, 2)  # (B, H, T)
        return log_a.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dk)


class GatedRetentionPreTrainedModel(SharedPreTrainedModel):
    config_class = GatedRetentionConfig
    config: GatedRetentionConfig


class GatedRetentionModel(GatedRetentionPreTrainedModel, SequenceBackbone):
    """The bare gated-retention backbone."""

    mixer_class = GatedRetention


class GatedRetentionForCausalLM(GatedRetentionPreTrainedModel, ForCausalLMHead):
    backbone_class = GatedRetentionModel


class GatedRetentionForMaskedLM(GatedRetentionPreTrainedModel, ForMaskedLMHead):
    backbone_class = GatedRetentionModel


class GatedRetentionForSequenceClassification(GatedRetentionPreTrainedModel, ForSequenceClassificationHead):
    backbone_class = GatedRetentionModel


class GatedRetentionForTokenClassification(GatedRetentionPreTrainedModel, ForTokenClassificationHead):
    backbone_class = GatedRetentionModel


class GatedRetentionForQuestionAnswering(GatedRetentionPreTrainedModel, ForQuestionAnsweringHead):
    backbone_class = GatedRetentionModel


class GatedRetentionForConditionalGeneration(ForConditionalGenerationHead, GatedRetentionPreTrainedModel):
    """Seq2seq LM: bidirectional encoder and causal decoder stacks of GatedRetentionModel, with cross-attention."""

    backbone_class = GatedRetentionModel


AUTO_CLASSES = {
    "AutoModel": GatedRetentionModel,
    "AutoModelForCausalLM": GatedRetentionForCausalLM,
    "AutoModelForMaskedLM": GatedRetentionForMaskedLM,
    "AutoModelForSequenceClassification": GatedRetentionForSequenceClassification,
    "AutoModelForTokenClassification": GatedRetentionForTokenClassification,
    "AutoModelForQuestionAnswering": GatedRetentionForQuestionAnswering,
    "AutoModelForSeq2SeqLM": GatedRetentionForConditionalGeneration,
}
register_family(GatedRetentionConfig, AUTO_CLASSES)

__all__ = [cls.__name__ for cls in AUTO_CLASSES.values()] + ["GatedRetentionPreTrainedModel"]
