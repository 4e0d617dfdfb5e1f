"""Task heads, written once for every sequence family.

A family's head is `class RetNetForX(RetNetPreTrainedModel, ForXHead): backbone_class = RetNetModel`. The base model
is built directly (not through `AutoModel.from_config`, which fails inside a `trust_remote_code` load), the losses are
transformers' own (`self.loss_function`), and the MoE load-balancing loss is added so that it stays right under
gradient accumulation and DDP.

transformers' `GenericFor*` heads are not subclassed: they lack mean pooling for bidirectional encoders, the MoE
auxiliary loss and weighted layer features, which is most of what a head here does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple

from .backbone import SharedPreTrainedModel, pop_cache_kwarg
from .input_checks import check_labels, check_sequence_labels, check_span_positions, input_shape

# the padding-free batch markers of transformers' DataCollatorWithFlattening that the backbone reads (see packing.py)
PACKING_KWARGS = ("seq_idx", "cu_seq_lens_q")


class LayerFeatures(nn.Module):
    """ELMo-style features: `scale * sum_l softmax(w)_l * h_l` over the embeddings and every layer's output."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(num_layers + 1))
        self.scale = nn.Parameter(torch.ones(1))

    def init_custom_weights(self, config) -> None:
        init.zeros_(self.layer_weights)
        init.ones_(self.scale)

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        weights = torch.softmax(self.layer_weights, dim=0).to(hidden_states[0].dtype)
        stacked = torch.stack(hidden_states, dim=0)
        return self.scale.to(stacked.dtype) * torch.einsum("l,lbtd->btd", weights, stacked)


def scaled_aux_loss(aux: torch.Tensor, coef: float, labels: torch.Tensor, num_items_in_batch, shift: bool):
    """The MoE auxiliary loss weighted like the token loss it is added to.

    When the trainer passes `num_items_in_batch` (the token count of the whole accumulated, possibly multi-process
    batch), the token loss is a sum divided by that count, so the aux term is weighted by this micro-batch's share
    of tokens; summed over micro-batches (and averaged over DDP ranks after the trainer's world-size scaling) it
    is then the token-weighted mean, exactly as with one big batch.
    """
    if num_items_in_batch is None:
        return coef * aux
    counted = labels[..., 1:] if shift else labels
    share = counted.ne(-100).sum().to(aux.dtype) / torch.as_tensor(
        num_items_in_batch, device=aux.device, dtype=aux.dtype
    )
    return coef * aux * share


class BackboneHead(SharedPreTrainedModel):
    """Builds the family backbone and, optionally, weighted layer features."""

    backbone_class: type[nn.Module]

    def _build_backbone(self, config) -> None:
        self.model = self.backbone_class(config)
        self.layer_features = LayerFeatures(config.num_hidden_layers) if config.use_layer_features else None

    def _run_backbone(
        self,
        input_ids,
        attention_mask,
        position_ids,
        cache,
        inputs_embeds,
        use_cache,
        output_hidden_states,
        kwargs,
        prefix_mask=None,
    ):
        cache = pop_cache_kwarg(cache, kwargs)
        want_hidden = bool(output_hidden_states) or self.layer_features is not None
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=want_hidden,
            prefix_mask=prefix_mask,
            **{name: kwargs[name] for name in PACKING_KWARGS if kwargs.get(name) is not None},
        )
        features = (
            self.layer_features(outputs.hidden_states) if self.layer_features is not None else outputs.last_hidden_state
        )
        return features, outputs

    def _with_aux(self, loss, outputs, labels, kwargs, shift: bool):
        if loss is None or outputs.aux_loss is None or self.config.router_aux_loss_coef == 0:
            return loss
        return loss + scaled_aux_loss(
            outputs.aux_loss, self.config.router_aux_loss_coef, labels, kwargs.get("num_items_in_batch"), shift
        )


class LMHeadBase(BackboneHead):
    """A backbone and a language-model head `lm_head` tied to the input embeddings (causal and masked LMs).

    `requires_bidirectional` says which backbone direction the head needs; the embedding accessors are transformers'
    `EmbeddingAccessMixin` (`model.embed_tokens`, `lm_head`).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    requires_bidirectional: bool
    direction_hint: str

    def __init__(self, config):
        super().__init__(config)
        if config.bidirectional != self.requires_bidirectional:
            raise ValueError(f"{type(self).__name__} {self.direction_hint}")
        self._build_backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _lm_loss(self, logits, labels, outputs, kwargs, shift: bool):
        """transformers' LM loss (shifted for causal LMs) plus the scaled MoE auxiliary loss; `None` without labels."""
        if labels is None:
            return None
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return self._with_aux(loss, outputs, labels, kwargs, shift=shift)


class ForCausalLMHead(LMHeadBase, GenerationMixin):
    """Language-model head tied to the input embeddings; generates with the fixed-size recurrent cache."""

    requires_bidirectional = False
    direction_hint = (
        "predicts the next token and cannot see the future: build it with `bidirectional=False` (use the ForMaskedLM "
        "head for a bidirectional model)."
    )

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        logits_to_keep: int | torch.Tensor = 0,
        prefix_mask=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`prefix_mask` (prefix LMs, e.g. DyT with `prefix_lm=True`): 1 on source tokens, which attend both ways."""
        check_labels(labels, input_shape(input_ids, inputs_embeds))
        features, outputs = self._run_backbone(
            input_ids,
            attention_mask,
            position_ids,
            cache,
            inputs_embeds,
            use_cache,
            output_hidden_states,
            kwargs,
            prefix_mask=prefix_mask,
        )
        logits = self.lm_head(slice_logits_to_keep(features, logits_to_keep))
        return CausalLMOutputWithPast(
            loss=self._lm_loss(logits, labels, outputs, kwargs, shift=True),
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )


class ForMaskedLMHead(LMHeadBase):
    """Masked-LM head on a bidirectional backbone, tied to the input embeddings."""

    requires_bidirectional = True
    direction_hint = "fills in masked tokens from both sides: build it with `bidirectional=True`."

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        **kwargs,
    ) -> MaskedLMOutput:
        check_labels(labels, input_shape(input_ids, inputs_embeds))
        features, outputs = self._run_backbone(
            input_ids, attention_mask, position_ids, None, inputs_embeds, False, output_hidden_states, kwargs
        )
        logits = self.lm_head(features)
        return MaskedLMOutput(
            loss=self._lm_loss(logits, labels, outputs, kwargs, shift=False),
            logits=logits,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )


def last_token_index(input_ids, attention_mask, pad_token_id, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Index of each row's last real token; works for left and right padding."""
    if attention_mask is not None:
        real = attention_mask[:, -seq_len:].to(device, torch.int32)
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids.ne(pad_token_id).to(device, torch.int32)
    else:
        return torch.full((batch_size,), seq_len - 1, device=device, dtype=torch.long)
    positions = torch.arange(seq_len, device=device, dtype=torch.int32)
    return (positions * real).argmax(-1).long()


class _ClassifierHead(BackboneHead):
    """A backbone, dropout and a linear `score` over `num_labels` (sequence and token classification)."""

    # the generic transformers losses below do not divide by num_items_in_batch: let Trainer scale for accumulation
    accepts_loss_kwargs = False
    score_bias: bool

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self._build_backbone(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=self.score_bias)
        self.post_init()


class ForSequenceClassificationHead(_ClassifierHead):
    """Sequence classification: last real token (causal) or mean of real tokens (bidirectional), then `score`."""

    score_bias = False

    def pool(self, features, input_ids, attention_mask) -> torch.Tensor:
        mode = self.config.classifier_pooling
        if mode == "auto":
            mode = "mean" if self.config.bidirectional else "last"
        batch_size, seq_len = features.shape[:2]
        if mode == "first":
            return features[:, 0]
        if mode == "mean":
            if attention_mask is None:
                return features.mean(1)
            weights = attention_mask[:, -seq_len:].to(features.dtype).unsqueeze(-1)
            return (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        idx = last_token_index(
            input_ids, attention_mask, self.config.pad_token_id, batch_size, seq_len, features.device
        )
        return features[torch.arange(batch_size, device=features.device), idx]

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        shape = input_shape(input_ids, inputs_embeds)
        check_sequence_labels(labels, shape and shape[0], self.config.num_labels)
        features, outputs = self._run_backbone(
            input_ids, attention_mask, position_ids, None, inputs_embeds, False, output_hidden_states, kwargs
        )
        pooled = self.score(self.dropout(self.pool(features, input_ids, attention_mask)))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled, config=self.config)
            loss = self._with_aux(loss, outputs, labels, {}, shift=False)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=outputs.hidden_states if output_hidden_states else None
        )


class ForTokenClassificationHead(_ClassifierHead):
    """Per-token classification (`score` on every position)."""

    score_bias = True

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        **kwargs,
    ) -> TokenClassifierOutput:
        check_labels(labels, input_shape(input_ids, inputs_embeds))
        features, outputs = self._run_backbone(
            input_ids, attention_mask, position_ids, None, inputs_embeds, False, output_hidden_states, kwargs
        )
        logits = self.score(self.dropout(features))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
            loss = self._with_aux(loss, outputs, labels, {}, shift=False)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states if output_hidden_states else None
        )


class ForQuestionAnsweringHead(BackboneHead):
    """Extractive QA: start and end logits for every token (`qa_outputs`)."""

    accepts_loss_kwargs = False  # transformers' QA loss is a mean: let Trainer scale for accumulation

    def __init__(self, config):
        super().__init__(config)
        self._build_backbone(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_hidden_states=None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput:
        shape = input_shape(input_ids, inputs_embeds)
        check_span_positions(start_positions, shape and shape[0], "start_positions")
        check_span_positions(end_positions, shape and shape[0], "end_positions")
        features, outputs = self._run_backbone(
            input_ids, attention_mask, position_ids, None, inputs_embeds, False, output_hidden_states, kwargs
        )
        start_logits, end_logits = self.qa_outputs(features).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
            loss = self._with_aux(loss, outputs, start_positions, {}, shift=False)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )
