"""Mamba-style selective state space models on the shared backbone, with every task head.

The mixer's parameters (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`) have the names, shapes
and initialisation of transformers' `MambaMixer`; only the modules around it are named by the shared backbone
(`model.embed_tokens`, `model.layers.N.mixer_norm`, `model.norm`). `hf_extras.convert.mamba` maps one to the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from .backbone import SequenceBackbone, SharedPreTrainedModel, register_family
from .configuration_mamba import HfxMambaConfig
from .conv_ops import cached_conv_act
from .heads import (
    ForCausalLMHead,
    ForMaskedLMHead,
    ForQuestionAnsweringHead,
    ForSequenceClassificationHead,
    ForTokenClassificationHead,
)
from .scan_ops import selective_scan
from .seq2seq import ForConditionalGenerationHead


class HfxMambaMixer(nn.Module):
    """The selective SSM block: `in_proj` -> (x, z); causal depthwise conv + act on x; `x_proj` -> (dt, B, C);
    `dt = softplus(dt_proj(dt))`; `A = -exp(A_log)`; `y = scan(x) + D x`; `out_proj(y * silu(z))`.

    Padding: x is zeroed at padded positions before the conv and after it, and `dt = 0` there, so a padded token
    neither enters the conv window of later tokens nor changes the SSM state (`exp(0 * A) = 1`, `0 * B x = 0`):
    left padding changes nothing, and right padding never leaks into a bidirectional scan.
    """

    def __init__(self, config: HfxMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.mixer_intermediate_size
        self.ssm_state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.time_step_rank = int(config.time_step_rank)
        self.forward_mode = config.forward_mode
        self.chunk_size = config.chunk_size
        self.bidirectional = config.bidirectional
        self.hidden_act = config.hidden_act
        self.act = ACT2FN[config.hidden_act]
        self.in_proj = nn.Linear(self.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size,
            self.intermediate_size,
            kernel_size=config.conv_kernel,
            groups=self.intermediate_size,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.x_proj = nn.Linear(self.intermediate_size, self.time_step_rank + 2 * self.ssm_state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, self.ssm_state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    @torch.no_grad()
    def init_custom_weights(self, config) -> None:
        """transformers' `MambaPreTrainedModel._init_weights` for a mixer (S4D-real `A`, `D = 1`, `dt` range)."""
        A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(A)[None, :].expand(self.intermediate_size, -1))
        init.ones_(self.D)
        dt_init_std = config.time_step_rank**-0.5 * config.time_step_scale
        if config.time_step_init_scheme == "constant":
            init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(
            torch.rand(self.intermediate_size, device=self.dt_proj.bias.device, dtype=torch.float32)
            * (math.log(config.time_step_max) - math.log(config.time_step_min))
            + math.log(config.time_step_min)
        ).clamp(min=config.time_step_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            init.zeros_(self.conv1d.bias)
        init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        if config.rescale_prenorm_residual:
            init.copy_(self.out_proj.weight, self.out_proj.weight / math.sqrt(config.num_hidden_layers))

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        cache=None,
        document_starts=None,
    ):
        """`document_starts`: packed documents' boundaries, where the state and the conv window reset (`None` when
        the batch is not packed); a pad reaches no later token through the conv and passes the state (`dt = 0`)."""
        dtype = hidden_states.dtype
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        keep = attention_mask[..., None].to(x.dtype) if attention_mask is not None else None
        x = cached_conv_act(
            x,
            self.conv1d,
            cache,
            self.layer_idx,
            self.hidden_act,
            self.act,
            padding_mask=attention_mask,
            document_starts=document_starts,
        )
        dt, B, C = self.x_proj(x).split([self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        if keep is not None:  # dt = 0: the state passes a padded token unchanged
            dt = dt * keep.float()
        A = -torch.exp(self.A_log.float())

        state = cache.read_recurrent(self.layer_idx) if cache is not None else None
        y, new_state = selective_scan(
            x,
            dt,
            A,
            B,
            C,
            self.D,
            mode=self.forward_mode,
            chunk_size=self.chunk_size,
            initial_state=state,
            output_final_state=cache is not None,
            bidirectional=self.bidirectional,
            reset=document_starts,
        )
        if cache is not None:
            cache.write_recurrent(self.layer_idx, new_state)
        y = y * F.silu(z.float())
        return self.out_proj(y.to(dtype))


class HfxMambaPreTrainedModel(SharedPreTrainedModel):
    config_class = HfxMambaConfig
    config: HfxMambaConfig


class HfxMambaModel(HfxMambaPreTrainedModel, SequenceBackbone):
    """The bare Mamba-style backbone: embeddings, `x + mixer(norm(x))` blocks, final norm."""

    mixer_class = HfxMambaMixer


class HfxMambaForCausalLM(HfxMambaPreTrainedModel, ForCausalLMHead):
    backbone_class = HfxMambaModel


class HfxMambaForMaskedLM(HfxMambaPreTrainedModel, ForMaskedLMHead):
    backbone_class = HfxMambaModel


class HfxMambaForSequenceClassification(HfxMambaPreTrainedModel, ForSequenceClassificationHead):
    backbone_class = HfxMambaModel


class HfxMambaForTokenClassification(HfxMambaPreTrainedModel, ForTokenClassificationHead):
    backbone_class = HfxMambaModel


class HfxMambaForQuestionAnswering(HfxMambaPreTrainedModel, ForQuestionAnsweringHead):
    backbone_class = HfxMambaModel


class HfxMambaForConditionalGeneration(ForConditionalGenerationHead, HfxMambaPreTrainedModel):
    """Seq2seq LM: bidirectional encoder and causal decoder stacks of HfxMambaModel, with cross-attention."""

    backbone_class = HfxMambaModel


AUTO_CLASSES = {
    "AutoModel": HfxMambaModel,
    "AutoModelForCausalLM": HfxMambaForCausalLM,
    "AutoModelForMaskedLM": HfxMambaForMaskedLM,
    "AutoModelForSequenceClassification": HfxMambaForSequenceClassification,
    "AutoModelForTokenClassification": HfxMambaForTokenClassification,
    "AutoModelForQuestionAnswering": HfxMambaForQuestionAnswering,
    "AutoModelForSeq2SeqLM": HfxMambaForConditionalGeneration,
}
register_family(HfxMambaConfig, AUTO_CLASSES)

__all__ = [cls.__name__ for cls in AUTO_CLASSES.values()] + ["HfxMambaPreTrainedModel", "HfxMambaMixer"]
