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

Warm start: `from_pretrained` on a folder saved by another head of the family (a pretrained causal LM, the usual
case) builds the encoder-decoder from it (`warm_start_from`): the shared embedding / LM head, the encoder stack and
the decoder stack all start from the pretrained backbone; only the cross-attention (and its norm) is new.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import shift_tokens_right
from transformers.utils import ModelOutput, can_return_tuple, logging

from .backbone import SharedPreTrainedModel, pop_cache_kwarg
from .heads import scaled_aux_loss
from .input_checks import check_seq2seq_inputs
from .packing import packed_document_starts

logger = logging.get_logger(__name__)

# hub arguments that locate a folder's config.json (everything else `from_pretrained` takes is for the model)
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


def saved_as_encoder_decoder(pretrained_model_name_or_path, kwargs: dict) -> bool:
    """Whether the folder's (or Hub repo's) config.json was saved by an encoder-decoder head."""
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
    return bool(config_dict.get("is_encoder_decoder", False))


def source_document_starts(encoder_states: torch.Tensor, attention_mask, position_ids) -> torch.Tensor | None:
    """The packed sources' boundaries (as the encoder found them), for the decoder's cross-attention mask."""
    if position_ids is None:
        return None
    batch, length = encoder_states.shape[:2]
    return packed_document_starts(batch, length, attention_mask, position_ids.view(-1, length).expand(batch, -1))


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, except that a folder saved by another head of the family (a causal LM,
        masked LM, classifier, ...) warm-starts the encoder-decoder from it (`warm_start_from`)."""
        if (
            pretrained_model_name_or_path is not None
            and not isinstance(pretrained_model_name_or_path, PreTrainedModel)
            and kwargs.get("state_dict") is None
            and not kwargs.get("gguf_file")
            and not saved_as_encoder_decoder(pretrained_model_name_or_path, kwargs)
        ):
            return cls.warm_start_from(pretrained_model_name_or_path, *model_args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def warm_start_from(cls, source: PreTrainedModel | str | os.PathLike, *model_args, **kwargs):
        """An encoder-decoder initialised from a pretrained model of the same family (normally its causal LM).

        `source` is the model or its folder / Hub id (loaded with `from_pretrained(source, **kwargs)` as the head it
        was saved from). Encoder and decoder stacks both start from its backbone (decoder blocks beyond its depth,
        and every cross-attention with its norm, are new and initialised as in training from scratch); the shared
        embedding and the tied LM head are its embedding (an untied LM head of the source is copied too).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        if not isinstance(source, PreTrainedModel):
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config_dict, _ = PreTrainedConfig.get_config_dict(source, **hub)
            module = sys.modules[cls.__module__]  # the family's modeling file, also under trust_remote_code
            saved_as = next(iter(config_dict.get("architectures") or []), None)
            source_class = getattr(module, saved_as, None) if saved_as else None
            if not (isinstance(source_class, type) and issubclass(source_class, SharedPreTrainedModel)):
                source_class = cls.backbone_class
            source = source_class.from_pretrained(source, *model_args, **kwargs)
        base = source.base_model
        if not isinstance(base, cls.backbone_class):
            raise ValueError(
                f"{cls.__name__} warm-starts from a model of its own family ({cls.backbone_class.__name__}); "
                f"got {type(source).__name__}."
            )
        config = copy.deepcopy(source.config)
        config.bidirectional = False  # the encoder stack is made bidirectional by `stack_config`
        config.architectures = [cls.__name__]
        if getattr(config, "prefix_lm", False):
            config.prefix_lm = False
        model = cls(config).to(device=source.device, dtype=source.dtype)
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("embed_tokens.")}
        new_keys = []
        with torch.no_grad():
            model.shared.weight.copy_(base.get_input_embeddings().weight)
            for name in ("encoder", "decoder"):
                missing, _ = getattr(model, name).load_state_dict(state, strict=False)
                new_keys += [f"{name}.{k}" for k in missing if not k.startswith("embed_tokens.")]
            source_head = source.get_output_embeddings() if hasattr(source, "get_output_embeddings") else None
            if (
                not config.tie_word_embeddings
                and isinstance(source_head, nn.Linear)
                and source_head.weight.shape == model.lm_head.weight.shape
            ):
                model.lm_head.weight.copy_(source_head.weight)
        logger.info(f"{cls.__name__} warm-started from {type(source).__name__}; new (initialised): {new_keys}")
        model.eval()
        if output_loading_info:
            return model, {
                "missing_keys": set(new_keys),
                "unexpected_keys": set(),
                "mismatched_keys": set(),
                "error_msgs": [],
            }
        return model

    def set_input_embeddings(self, value):
        # the encoder and decoder stacks read the shared table too (the getter and `lm_head` are transformers' own)
        self.shared = self.encoder.embed_tokens = self.decoder.embed_tokens = value

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """transformers' resize, and the new size also in both stacks' configs (their input checks read it)."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        self.encoder.config.vocab_size = self.decoder.config.vocab_size = self.config.vocab_size
        return embeddings

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
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Packed pairs (padding-free training): `position_ids` restarting at 0 at each source and
        `decoder_position_ids` restarting at 0 at each target, the i-th target of a row answering its i-th source;
        the encoder and the decoder then keep documents apart and cross-attention stays within each pair."""
        cache = pop_cache_kwarg(cache, kwargs)
        check_seq2seq_inputs(
            self.config.hidden_size, input_ids if encoder_outputs is None else None, inputs_embeds, attention_mask,
            decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask, labels,
        )  # fmt: skip
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
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
            encoder_document_starts=source_document_starts(
                encoder_outputs.last_hidden_state, attention_mask, position_ids
            ),
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
