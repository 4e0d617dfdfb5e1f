"""DyT Transformer: multi-head softmax attention on the shared backbone, norms as Dynamic Tanh, every task head.

Differences from the recurrent families, all through the backbone's hooks:
- the cache is transformers' `DynamicCache` (a growing KV cache, one `full_attention` layer per block), and the model
  opts back in to transformers' default cache (`_supports_default_dynamic_cache`, not stateful);
- each mixer gets the 4-D mask that `transformers.masking_utils` builds for the configured attention implementation
  (`create_causal_mask`, or `create_bidirectional_mask` for encoders) from the 2-D padding mask and the cache;
- sinusoidal or learned positions (and the optional learnable embedding scale) are added to the token embeddings;
  rotary positions are applied to q/k inside the mixer. Positions count real tokens only, so left padding changes
  nothing, and continue from `cache.get_seq_length()` when decoding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .attention import MultiHeadSelfAttention
from .attention_masks import attention_document_mask_function, mask_with_cached_tokens
from .backbone import SequenceBackbone, SharedPreTrainedModel, register_family
from .configuration_dyt import DyTConfig
from .heads import (
    ForCausalLMHead,
    ForMaskedLMHead,
    ForQuestionAnsweringHead,
    ForSequenceClassificationHead,
    ForTokenClassificationHead,
)
from .positions import sinusoidal_embedding
from .seq2seq import ForConditionalGenerationHead


class EmbeddingScale(nn.Module):
    """A learnable scalar multiplying the token embeddings (the DyT paper's LLaMA setting; init sqrt(d))."""

    def __init__(self, init_value: float):
        super().__init__()
        self.init_value = float(init_value)
        self.scale = nn.Parameter(torch.full((1,), self.init_value))

    def init_custom_weights(self, config) -> None:
        init.constant_(self.scale, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"init_value={self.init_value:.4g}"


class DyTPreTrainedModel(SharedPreTrainedModel):
    config_class = DyTConfig
    config: DyTConfig
    _is_stateful = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # a plain KV cache: transformers' own DynamicCache is the right one
        return True


class DyTModel(DyTPreTrainedModel, SequenceBackbone):
    """The bare DyT Transformer: token (+ position) embeddings, attention blocks, final norm."""

    mixer_class = MultiHeadSelfAttention

    def __init__(self, config: DyTConfig):
        super().__init__(config)
        self.embed_scale = EmbeddingScale(config.resolved_embedding_scale_init) if config.embedding_scale else None
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.embed_positions = None
        self.post_init()  # again: initialise the modules added after the shared backbone's post_init

    def prepare_cache(self, cache, use_cache: bool):
        if cache is None:
            return DynamicCache(config=self.config) if use_cache else None
        if not isinstance(cache, Cache):
            raise TypeError(
                f"{type(self).__name__} keeps a key/value cache and needs a transformers `Cache` (e.g. "
                f"`DynamicCache(config=model.config)`), got {type(cache).__name__}."
            )
        return cache

    def finish_embeddings(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_scale(inputs_embeds) if self.embed_scale is not None else inputs_embeds
        kind = self.config.position_embedding_type
        if kind == "sinusoidal":
            hidden = hidden + sinusoidal_embedding(position_ids, self.config.hidden_size, hidden.dtype)
        elif kind == "learned":
            limit = self.config.max_position_embeddings
            if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= limit:
                raise ValueError(
                    f"Position {int(position_ids.max())} is past the learned position table "
                    f"(`max_position_embeddings={limit}`): shorten the input or build the model with a larger table."
                )
            hidden = hidden + self.embed_positions(position_ids).to(hidden.dtype)
        return hidden

    def mixer_attention_mask(
        self,
        padding_mask,
        inputs_embeds: torch.Tensor,
        cache,
        position_ids: torch.Tensor,
        prefix_mask=None,
        document_starts=None,
    ):
        same_document = attention_document_mask_function(document_starts, cache)
        padding_mask = mask_with_cached_tokens(padding_mask, cache, inputs_embeds.shape[1])
        if self.config.bidirectional:
            return create_bidirectional_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=padding_mask,
                and_mask_function=same_document,
            )
        return create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=padding_mask,
            cache=cache,
            position_ids=None,  # the boundaries are ours (no second, syncing detection in the masking utilities)
            block_sequence_ids=self.prefix_blocks(prefix_mask, inputs_embeds, cache),
            and_mask_function=same_document,
        )

    @staticmethod
    def prefix_blocks(prefix_mask, inputs_embeds: torch.Tensor, cache) -> torch.Tensor | None:
        """A prefix LM's mask as transformers' `block_sequence_ids`: the source is one block (0: bidirectional within
        it), target tokens are -1 (causal); `masking_utils` pads missing trailing columns with -1 (target)."""
        if prefix_mask is None:
            return None
        total = (cache.get_seq_length() if cache is not None else 0) + inputs_embeds.shape[1]
        if prefix_mask.dim() != 2 or prefix_mask.shape[0] != inputs_embeds.shape[0] or prefix_mask.shape[1] > total:
            raise ValueError(
                f"`prefix_mask` must be (batch={inputs_embeds.shape[0]}, length <= {total}) with 1 on source tokens "
                f"from the start of the sequence, got {tuple(prefix_mask.shape)}."
            )
        return torch.where(prefix_mask.bool(), 0, -1).to(inputs_embeds.device)


class DyTForCausalLM(DyTPreTrainedModel, ForCausalLMHead):
    backbone_class = DyTModel


class DyTForMaskedLM(DyTPreTrainedModel, ForMaskedLMHead):
    backbone_class = DyTModel


class DyTForSequenceClassification(DyTPreTrainedModel, ForSequenceClassificationHead):
    backbone_class = DyTModel


class DyTForTokenClassification(DyTPreTrainedModel, ForTokenClassificationHead):
    backbone_class = DyTModel


class DyTForQuestionAnswering(DyTPreTrainedModel, ForQuestionAnsweringHead):
    backbone_class = DyTModel


class DyTForConditionalGeneration(ForConditionalGenerationHead, DyTPreTrainedModel):
    """Seq2seq LM: bidirectional encoder and causal decoder stacks of DyTModel, with cross-attention."""

    backbone_class = DyTModel


AUTO_CLASSES = {
    "AutoModel": DyTModel,
    "AutoModelForCausalLM": DyTForCausalLM,
    "AutoModelForMaskedLM": DyTForMaskedLM,
    "AutoModelForSequenceClassification": DyTForSequenceClassification,
    "AutoModelForTokenClassification": DyTForTokenClassification,
    "AutoModelForQuestionAnswering": DyTForQuestionAnswering,
    "AutoModelForSeq2SeqLM": DyTForConditionalGeneration,
}
register_family(DyTConfig, AUTO_CLASSES)

__all__ = [cls.__name__ for cls in AUTO_CLASSES.values()] + ["DyTPreTrainedModel"]
