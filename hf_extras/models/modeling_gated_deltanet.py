"""Gated DeltaNet and DeltaNet on the shared backbone, with every task head.

The mixer is the published layer (Yang et al. 2025), as transformers' `Qwen3NextGatedDeltaNet` runs it: q/k/v
projections through a short causal depthwise conv and SiLU, L2-normalised q and k, `beta = sigmoid(x W_b)`, a
per-head decay `log a = -exp(A_log) * softplus(x W_a + dt_bias)` (`gate="none"`: DeltaNet, no decay), the
`delta_ops` kernel (fla's Triton kernels on CUDA when installed), a per-head RMS norm gated by `silu(x W_z)`, and an output projection.
fla's variants are options of the config: `allow_neg_eigval` (`beta = 2 sigmoid`), `output_gate_activation="sigmoid"`,
`silu_without_conv` (SiLU on q/k/v when there is no short conv). `attention_window` adds exact softmax attention over
the last tokens on the same q/k/v (rotary q/k before their L2 norm) to the normed output, before its gate (LoLCATs).
`hf_extras.convert.qwen3_next` maps Qwen3-Next's fused `in_proj_qkvz` / `in_proj_ba` into these projections and back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .backbone import SequenceBackbone, SharedPreTrainedModel, register_family
from .configuration_gated_deltanet import GatedDeltaNetConfig
from .conv_ops import cached_causal_conv
from .delta_ops import gated_delta_rule, pick_mode
from .fla_delta_dispatch import fla_gated_delta_rule
from .heads import (
    ForCausalLMHead,
    ForMaskedLMHead,
    ForQuestionAnsweringHead,
    ForSequenceClassificationHead,
    ForTokenClassificationHead,
)
from .positions import apply_rotary
from .seq2seq import ForConditionalGenerationHead
from .window_attention import window_attention_with_cache


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(|x|^2 + eps)` over the last dim (fla's and transformers' Qwen3-Next `l2norm`)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class GatedRMSNorm(nn.Module):
    """Per-head RMS norm of the output, then times `act(gate)` (Qwen3-Next's `RMSNormGated`, `act` = SiLU; fla's
    `FusedRMSNormGated` also offers sigmoid; no gate: plain)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, activation: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.activation = F.silu if activation == "silu" else torch.sigmoid

    def forward(
        self, x: torch.Tensor, gate: torch.Tensor | None = None, added: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`added` (a softmax window's output) joins the normed `x` before the gate."""
        dtype = x.dtype
        x32 = x.float()
        x = self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if added is not None:
            x = x + added.to(x.dtype)
        if gate is not None:
            x = x * self.activation(gate.float())
        return x.to(dtype)


class GatedDeltaNetMixer(nn.Module):
    """The Gated DeltaNet token mixer (see the module docstring); grouped key heads, cacheable conv and state.

    Padding: at a padded token the conv input is zeroed (nothing reaches later tokens through the conv window),
    k = v = 0 and the log decay is 0, so the state passes it unchanged, in either direction.
    Packed documents (position ids restarting at 0): the log decay is `-inf` at each document's first token (the
    state resets, in both directions) and the conv window stops there, so each document gets its outputs alone.
    """

    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads  # value heads
        self.num_key_heads = config.num_key_heads
        self.key_head_dim = config.key_head_dim
        self.value_head_dim = config.value_head_dim
        self.key_dim = self.num_key_heads * self.key_head_dim
        self.value_dim = self.num_heads * self.value_head_dim
        self.gate = config.gate
        self.bidirectional = config.bidirectional
        self.forward_mode = config.forward_mode
        self.chunk_size = config.chunk_size
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        if self.gate == "head":
            self.a_proj = nn.Linear(hidden, self.num_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(self.num_heads))
            self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.g_proj = nn.Linear(hidden, self.value_dim, bias=False) if config.use_output_gate else None
        self.conv_size = config.conv_size if config.use_short_conv else 0
        self.silu_without_conv = config.silu_without_conv
        self.allow_neg_eigval = config.allow_neg_eigval
        self.attention_window = config.attention_window
        if self.conv_size > 0:  # one depthwise conv over the concatenated q, k, v channels (Qwen3-Next's order)
            channels = 2 * self.key_dim + self.value_dim
            self.conv1d = nn.Conv1d(channels, channels, self.conv_size, groups=channels, bias=False)
        self.o_norm = GatedRMSNorm(self.value_head_dim, config.norm_eps, config.output_gate_activation)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)

    @torch.no_grad()
    def init_custom_weights(self, config) -> None:
        """The published initialisation of the decay: `A ~ U(1, 16)`, `dt ~ logU(1e-3, 0.1)`, `dt_bias = softplus^-1(dt)`
        (custom parameters, so `from_pretrained` re-initialises only what a checkpoint lacks)."""
        if self.gate != "head":
            return
        A = torch.empty(self.num_heads, device=self.A_log.device, dtype=torch.float32).uniform_(1.0, 16.0)
        init.copy_(self.A_log, torch.log(A))
        dt = torch.exp(
            torch.rand(self.num_heads, device=self.dt_bias.device, dtype=torch.float32)
            * (math.log(0.1) - math.log(1e-3))
            + math.log(1e-3)
        ).clamp(min=1e-4)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """`(B, H, T)` log decays (float32), or `None` for DeltaNet."""
        if self.gate == "none":
            return None
        a = self.a_proj(hidden_states).float() + self.dt_bias.float()
        return (-torch.exp(self.A_log.float()) * F.softplus(a)).transpose(1, 2)

    def _window(self, q, k, v, attention_mask, position_embeddings, cache, starts) -> torch.Tensor:
        """The softmax window's output `(B, T, H, Dv)` from the un-normalised q/k (rotary, `1/sqrt(d)` scale)."""
        batch, seq_len = q.shape[:2]
        group = self.num_heads // self.num_key_heads
        q, k = (
            x.view(batch, seq_len, self.num_key_heads, self.key_head_dim)
            .repeat_interleave(group, dim=2)
            .transpose(1, 2)
            for x in (q, k)
        )
        v = v.view(batch, seq_len, self.num_heads, self.value_head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
        out = window_attention_with_cache(
            q,
            k * self.key_head_dim**-0.5,
            v,
            self.attention_window,
            cache,
            self.layer_idx,
            bidirectional=self.bidirectional,
            padding_mask=attention_mask,
            document_starts=starts,
        )
        return out.transpose(1, 2)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        cache=None,
        document_starts=None,
    ):
        """`document_starts`: packed documents' boundaries (`None` when the batch is not packed)."""
        batch, seq_len, _ = hidden_states.shape
        starts = document_starts
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.conv_size > 0:  # pads and earlier documents never reach a token through the conv window
            qkv = torch.cat([q, k, v], dim=-1)
            mixed = cached_causal_conv(
                qkv,
                self.conv1d,
                cache,
                self.layer_idx,
                padding_mask=attention_mask,
                document_starts=starts,
                activation="silu",
            )
            q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        elif self.silu_without_conv:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        window_out = None
        if self.attention_window:
            window_out = self._window(q, k, v, attention_mask, position_embeddings, cache, starts)
        q = l2_normalize(q.view(batch, seq_len, self.num_key_heads, self.key_head_dim).float())
        k = l2_normalize(k.view(batch, seq_len, self.num_key_heads, self.key_head_dim).float())
        v = v.view(batch, seq_len, self.num_heads, self.value_head_dim)
        group = self.num_heads // self.num_key_heads
        if group > 1:  # each key head serves `group` consecutive value heads
            q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        q, k, v = q.transpose(1, 2).to(v.dtype), k.transpose(1, 2).to(v.dtype), v.transpose(1, 2)
        beta = torch.sigmoid(self.b_proj(hidden_states).float()).transpose(1, 2)
        if self.allow_neg_eigval:  # beta in (0, 2)
            beta = 2.0 * beta
        log_decay = self.log_decay(hidden_states)
        if attention_mask is not None:  # a padded token writes nothing and keeps the state: k = v = 0, log decay 0
            keep_t = attention_mask[:, None, :]
            k = k * keep_t[..., None].to(k.dtype)
            v = v * keep_t[..., None].to(v.dtype)
            if log_decay is not None:
                log_decay = log_decay * keep_t.to(log_decay.dtype)
        if starts is not None:  # a document's first token resets the state (log decay -inf: a = 0)
            if log_decay is None:
                log_decay = torch.zeros(batch, self.num_heads, seq_len, device=hidden_states.device)
            log_decay = log_decay.masked_fill(starts[:, None, :], float("-inf"))

        state = cache.read_recurrent(self.layer_idx) if cache is not None else None
        mode = self.forward_mode
        if mode == "auto":
            mode = pick_mode(seq_len, self.chunk_size, state is not None)
        kwargs = dict(
            scale=self.key_head_dim**-0.5,
            initial_state=state,
            output_final_state=cache is not None,
            bidirectional=self.bidirectional,
        )
        result = fla_gated_delta_rule(q, k, v, beta, log_decay, mode=mode, **kwargs)  # None unless CUDA + fla
        if result is None:
            result = gated_delta_rule(q, k, v, beta, log_decay, mode=mode, chunk_size=self.chunk_size, **kwargs)
        out, new_state = result
        if cache is not None:
            cache.write_recurrent(self.layer_idx, new_state)
        out = out.transpose(1, 2)  # (B, T, H, Dv)
        gate = None
        if self.g_proj is not None:
            gate = self.g_proj(hidden_states).view(batch, seq_len, self.num_heads, self.value_head_dim)
        out = self.o_norm(out, gate, window_out).reshape(batch, seq_len, self.value_dim)
        return self.o_proj(out.to(hidden_states.dtype))


class GatedDeltaNetPreTrainedModel(SharedPreTrainedModel):
    config_class = GatedDeltaNetConfig
    config: GatedDeltaNetConfig


class GatedDeltaNetModel(GatedDeltaNetPreTrainedModel, SequenceBackbone):
    """The bare Gated DeltaNet backbone."""

    mixer_class = GatedDeltaNetMixer


class GatedDeltaNetForCausalLM(GatedDeltaNetPreTrainedModel, ForCausalLMHead):
    backbone_class = GatedDeltaNetModel


class GatedDeltaNetForMaskedLM(GatedDeltaNetPreTrainedModel, ForMaskedLMHead):
    backbone_class = GatedDeltaNetModel


class GatedDeltaNetForSequenceClassification(GatedDeltaNetPreTrainedModel, ForSequenceClassificationHead):
    backbone_class = GatedDeltaNetModel


class GatedDeltaNetForTokenClassification(GatedDeltaNetPreTrainedModel, ForTokenClassificationHead):
    backbone_class = GatedDeltaNetModel


class GatedDeltaNetForQuestionAnswering(GatedDeltaNetPreTrainedModel, ForQuestionAnsweringHead):
    backbone_class = GatedDeltaNetModel


class GatedDeltaNetForConditionalGeneration(ForConditionalGenerationHead, GatedDeltaNetPreTrainedModel):
    """Seq2seq LM: bidirectional encoder and causal decoder stacks of GatedDeltaNetModel, with cross-attention."""

    backbone_class = GatedDeltaNetModel


AUTO_CLASSES = {
    "AutoModel": GatedDeltaNetModel,
    "AutoModelForCausalLM": GatedDeltaNetForCausalLM,
    "AutoModelForMaskedLM": GatedDeltaNetForMaskedLM,
    "AutoModelForSequenceClassification": GatedDeltaNetForSequenceClassification,
    "AutoModelForTokenClassification": GatedDeltaNetForTokenClassification,
    "AutoModelForQuestionAnswering": GatedDeltaNetForQuestionAnswering,
    "AutoModelForSeq2SeqLM": GatedDeltaNetForConditionalGeneration,
}
register_family(GatedDeltaNetConfig, AUTO_CLASSES)

__all__ = [cls.__name__ for cls in AUTO_CLASSES.values()] + ["GatedDeltaNetPreTrainedModel", "GatedDeltaNetMixer"]
