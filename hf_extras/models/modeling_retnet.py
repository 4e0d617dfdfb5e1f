"""RetNet: multi-scale retention on the shared backbone, with every task head."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .backbone import HfxModel, HfxPreTrainedModel, register_family
from .configuration_retnet import RetNetConfig
from .heads import (
    HfxForCausalLM,
    HfxForMaskedLM,
    HfxForQuestionAnswering,
    HfxForSequenceClassification,
    HfxForTokenClassification,
)
from .norms import RMSNorm
from .positions import apply_rotary, rotary_cos_sin
from .retention_ops import decayed_linear_attention, pick_mode


def retnet_log_decay(num_heads: int, device=None) -> torch.Tensor:
    """Per-head log decay `log(1 - 2^(-5-h))`: head 0 forgets fastest (gamma = 0.969), later heads keep longer."""
    exponents = -5.0 - torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log1p(-torch.pow(2.0, exponents))


class MultiScaleRetention(nn.Module):
    """Multi-scale retention: rotary q/k, fixed per-head decay, per-head RMS group norm, swish gate."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.value_dim = self.head_dim * config.value_factor
        self.bidirectional = config.bidirectional
        self.forward_mode = config.forward_mode
        self.chunk_size = config.chunk_size
        self.rope_theta = config.rope_theta
        value_width = config.hidden_size * config.value_factor
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, value_width, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, value_width, bias=False)
        self.o_proj = nn.Linear(value_width, config.hidden_size, bias=False)
        self.g_norm = RMSNorm(self.value_dim, config.norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None):
        batch, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq_len, self.num_heads, self.value_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, q.dtype)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin) * (self.head_dim**-0.5)
        if attention_mask is not None:  # padded tokens write nothing into the state
            keep = attention_mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep

        state = cache.read_recurrent(self.layer_idx) if cache is not None else None
        mode = self.forward_mode
        if mode == "auto":
            mode = pick_mode(seq_len, self.chunk_size, state is not None)
        out, new_state = decayed_linear_attention(
            q, k, v, retnet_log_decay(self.num_heads, q.device),
            mode=mode, chunk_size=self.chunk_size, initial_state=state,
            output_final_state=cache is not None, bidirectional=self.bidirectional,
        )
        if cache is not None:
            cache.write_recurrent(self.layer_idx, new_state)
        out = self.g_norm(out.transpose(1, 2)).reshape(batch, seq_len, self.num_heads * self.value_dim)
        return self.o_proj(F.silu(self.g_proj(hidden_states)) * out)


class RetNetPreTrainedModel(HfxPreTrainedModel):
    config_class = RetNetConfig
    config: RetNetConfig


class RetNetModel(RetNetPreTrainedModel, HfxModel):
    """The bare RetNet backbone: embeddings, retention blocks, final norm."""

    mixer_class = MultiScaleRetention


class RetNetForCausalLM(RetNetPreTrainedModel, HfxForCausalLM):
    backbone_class = RetNetModel


class RetNetForMaskedLM(RetNetPreTrainedModel, HfxForMaskedLM):
    backbone_class = RetNetModel


class RetNetForSequenceClassification(RetNetPreTrainedModel, HfxForSequenceClassification):
    backbone_class = RetNetModel


class RetNetForTokenClassification(RetNetPreTrainedModel, HfxForTokenClassification):
    backbone_class = RetNetModel


class RetNetForQuestionAnswering(RetNetPreTrainedModel, HfxForQuestionAnswering):
    backbone_class = RetNetModel


AUTO_CLASSES = {
    "AutoModel": RetNetModel,
    "AutoModelForCausalLM": RetNetForCausalLM,
    "AutoModelForMaskedLM": RetNetForMaskedLM,
    "AutoModelForSequenceClassification": RetNetForSequenceClassification,
    "AutoModelForTokenClassification": RetNetForTokenClassification,
    "AutoModelForQuestionAnswering": RetNetForQuestionAnswering,
}
register_family(RetNetConfig, AUTO_CLASSES)

__all__ = [
    "RetNetPreTrainedModel",
    "RetNetModel",
    "RetNetForCausalLM",
    "RetNetForMaskedLM",
    "RetNetForSequenceClassification",
    "RetNetForTokenClassification",
    "RetNetForQuestionAnswering",
]
