"""The seq2seq head, written once for every sequence family: an encoder-decoder of the family's own mixer.

A family's head is `class RetNetForConditionalGeneration(ForConditionalGenerationHead, RetNetPreTrainedModel):
backbone_class = RetNetModel`. The encoder is the family backbone built bidirectional (`num_hidden_layers` blocks),
the decoder the same backbone built causal (`num_decoder_layers` blocks) with a softmax cross-attention over the
encoder output in every block (`config.add_cross_attention`, see `backbone.SequenceBlock`); both read one shared
embedding, tied to the LM head. Labels are shifted right behind `decoder_start_token_id` exactly as transformers'
BART/T5 do, so `Seq2SeqTrainer`, `DataCollatorForSeq2Seq` and `generate()` work as for them.

Generation: the cache is transformers' `EncoderDecoderCache(self-state cache, DynamicCache())`. The self part is
the family's own (the fixed-size `RecurrentCache`, or DyT's KV cache) sized for the decoder's depth, which is why
the head builds it itself instead of letting `generate()` build one from the config; the cross part holds the
encoder keys/values, projected once on the first decoder step. Beam search reorders both.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import shift_tokens_right
from transformers.utils import ModelOutput, can_return_tuple

from .backbone import SharedPreTrainedModel, pop_cache_kwarg
from .heads import scaled_aux_loss


class ForConditionalGenerationHead(SharedPreTrainedModel, GenerationMixin):
    """Encoder-decoder LM of a family's mixer: `get_encoder()`, `get_decoder()`, `encoder_outputs`,
    `decoder_input_ids` / `decoder_attention_mask`, labels shifted right, `Seq2SeqLMOutput`."""

    backbone_class: type[nn.Module]
    _input_embed_layer = "shared"
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
        "lm_head.weight": "shared.weight",
    }

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the decoder's own cache (fixed-size state or KV) for its own depth: built in `forward`, not by `generate()`
        return False

    def __init__(self, config):
        if config.bidirectional:
            raise ValueError(
                f"{type(self).__name__} always reads the source both ways and writes the target causally: build it "
                "with `bidirectional=False`."
            )
        config.is_encoder_decoder = True
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.encoder = self.backbone_class(config.stack_config("encoder"))
        self.decoder = self.backbone_class(config.stack_config("decoder"))
        self.encoder.embed_tokens = self.decoder.embed_tokens = self.shared
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_input_embeddings(self, value):
        # the encoder and decoder stacks read the shared table too (the getter and `lm_head` are transformers' own)
        self.shared = self.encoder.embed_tokens = self.decoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: labels shifted right behind `decoder_start_token_id`, -100 -> pad."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def _seq2seq_cache(self, cache, use_cache: bool) -> EncoderDecoderCache | None:
        if not use_cache:
            return None
        if cache is None:
            return EncoderDecoderCache(self.decoder.prepare_cache(None, True), DynamicCache())
        if not isinstance(cache, EncoderDecoderCache):
            raise TypeError(
                f"{type(self).__name__} needs an `EncoderDecoderCache` (decoder state + cross-attention keys/values), "
                f"got {type(cache).__name__}; pass `cache=None` and one is created."
            )
        return cache

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        cache = pop_cache_kwarg(cache, kwargs)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_hidden_states=output_hidden_states,
            )
        elif not isinstance(encoder_outputs, ModelOutput):  # a tuple: (last_hidden_state, [hidden_states], ...)
            hidden = encoder_outputs[1] if len(encoder_outputs) > 1 else None
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0], hidden_states=hidden if isinstance(hidden, tuple) else None
            )
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "Pass `decoder_input_ids` (or `decoder_inputs_embeds`), or `labels` to shift into decoder inputs."
            )
        if labels is not None or (self.training and use_cache is None):
            use_cache = False  # teacher forcing sees the whole target at once
        elif use_cache is None:
            use_cache = self.config.use_cache
        cache = self._seq2seq_cache(cache, use_cache)

        decoder_outputs = self.decoder(
            decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
        )
        logits = self.lm_head(decoder_outputs.last_hidden_state)

        loss = None
        if labels is not None:
            loss = ForMaskedLMLoss(logits, labels, self.config.vocab_size, **kwargs)  # aligned: no shift here
            aux = [a for a in (getattr(encoder_outputs, "aux_loss", None), decoder_outputs.aux_loss) if a is not None]
            if aux and self.config.router_aux_loss_coef:
                loss = loss + scaled_aux_loss(
                    sum(aux), self.config.router_aux_loss_coef, labels, kwargs.get("num_items_in_batch"), shift=False
                )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )
