"""Multi-head softmax attention: self-attention as a token mixer of the shared backbone, and cross-attention over
encoder states for the seq2seq decoder blocks.

The attention itself goes through transformers' attention interface (`config._attn_implementation`: `"eager"`,
`"sdpa"`, or a registered backend), so the same weights run under every implementation; the mask it receives is the
one transformers' `masking_utils` prepared for that implementation (see `modeling_dyt.DyTModel`). The KV cache is
transformers' `DynamicCache`, updated here per layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .positions import apply_rotary


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Plain softmax attention on `(batch, heads, seq, head_dim)` tensors; `attention_mask` is additive (4-D) or None.

    Without a mask it applies causality itself when `module.is_causal` (the SDPA path does the same through
    `is_causal`), so both implementations agree whatever mask the masking utilities chose to skip.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:
        q_len, kv_len = query.shape[2], key.shape[2]
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).triu(kv_len - q_len + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class SoftmaxAttention(nn.Module):
    """q/k/v/o projections and the call into transformers' attention interface, shared by self- and cross-attention.

    `is_causal` is read by transformers' SDPA path when no mask is passed: False for encoders and cross-attention.
    """

    def __init__(self, config, layer_idx: int, is_causal: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = is_causal
        bias = getattr(config, "attention_bias", False)
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, seq, hidden)` -> `(batch, heads, seq, head_dim)`."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q, k, v, attention_mask) -> torch.Tensor:
        """Softmax attention under the configured implementation, then the output projection."""
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(out.reshape(q.shape[0], q.shape[2], -1))


class MultiHeadSelfAttention(SoftmaxAttention):
    """Self-attention token mixer: rotary positions on q/k (when the backbone hands tables), the KV cache, causal
    unless bidirectional."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, is_causal=not config.bidirectional)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        cache=None,
        document_starts=None,
    ):
        """`position_embeddings`: the rotary `(cos, sin)` tables the backbone computed for this forward, or `None`
        (sinusoidal/learned positions were already added to the embeddings). Packed documents
        (`document_starts`) are already in `attention_mask`, block-diagonal."""
        q = self.split_heads(self.q_proj(hidden_states))
        k = self.split_heads(self.k_proj(hidden_states))
        v = self.split_heads(self.v_proj(hidden_states))
        if position_embeddings is not None:
            q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return self.attend(q, k, v, attention_mask)


class CrossAttention(SoftmaxAttention):
    """Softmax attention of decoder tokens over encoder states (no positions: order lives in the states).

    With an `EncoderDecoderCache`, the encoder keys/values are projected once, on the first decoder step, into its
    `cross_attention_cache` (flagged in `is_updated`), and read back on every later step.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, is_causal=False)

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None, cache=None):
        """`encoder_attention_mask`: what `masking_utils.create_bidirectional_mask` made of the source padding mask;
        `cache`: the model's `EncoderDecoderCache`, or `None`."""
        q = self.split_heads(self.q_proj(hidden_states))
        if cache is not None and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            k, v = layer.keys, layer.values
        else:
            k = self.split_heads(self.k_proj(encoder_hidden_states))
            v = self.split_heads(self.v_proj(encoder_hidden_states))
            if cache is not None:
                k, v = cache.cross_attention_cache.update(k, v, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        return self.attend(q, k, v, encoder_attention_mask)
