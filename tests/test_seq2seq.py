"""Seq2seq encoder-decoders of every sequence family, and DyT's prefix LM."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_without_hf_extras
from families import FAMILIES, HEADS
from transformers import AutoModelForSeq2SeqLM, EncoderDecoderCache
from transformers.models.bart.modeling_bart import shift_tokens_right

import hf_extras

DYT = next(f for f in FAMILIES if f.name == "dyt")
# one family per modeling file for the slower subprocess checks
PER_MODULE = [f for f in FAMILIES if f.name in ("retnet", "gla", "dyt", "mamba")]


def seq2seq(family, **overrides):
    return family.cls("ForConditionalGeneration")(family.config(**overrides)).eval()


def padded_source(batch: int = 2, length: int = 11, pad: int = 3):
    src = torch.randint(7, 96, (batch, length))
    mask = torch.ones_like(src)
    mask[0, -pad:] = 0
    src[0, -pad:] = 0
    return src, mask


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_cache_equals_no_cache(family, mode):
    model = seq2seq(family, num_decoder_layers=3)  # a decoder deeper than the encoder: the cache must follow it
    src, mask = padded_source()
    kwargs = {
        "greedy": dict(do_sample=False),
        "beam": dict(do_sample=False, num_beams=3),
        "sample": dict(do_sample=True, top_k=8),
    }[mode]
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        outs.append(
            model.generate(
                src, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, use_cache=use_cache, **kwargs
            )
        )
    assert outs[0].shape == (2, 13)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_decoding_steps_use_both_caches(family):
    """After the first step the decoder sees one token; encoder keys/values are projected once per generate()."""
    model = seq2seq(family)
    decoder_lengths, cross_projections = [], []
    hooks = [
        model.decoder.register_forward_pre_hook(
            lambda m, a, kw: decoder_lengths.append((a[0] if a and a[0] is not None else kw["input_ids"]).shape[1]),
            with_kwargs=True,
        ),
        model.decoder.layers[0].cross_attn.k_proj.register_forward_hook(lambda *_: cross_projections.append(1)),
    ]
    src, mask = padded_source()
    model.generate(src, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for hook in hooks:
        hook.remove()
    assert decoder_lengths == [1] * 6 and len(cross_projections) == 1

    # step-by-step logits with the cache equal one teacher-forced pass
    target = torch.randint(7, 96, (2, 9))
    with torch.no_grad():
        full = model(src, attention_mask=mask, decoder_input_ids=target, use_cache=False).logits
        encoded = model.get_encoder()(src, attention_mask=mask)
        out = model(attention_mask=mask, encoder_outputs=encoded, decoder_input_ids=target[:, :4], use_cache=True)
        steps, cache = [out.logits], out.cache
        assert isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == 4
        for t in range(4, 9):
            out = model(
                attention_mask=mask, encoder_outputs=encoded, decoder_input_ids=target[:, t : t + 1], cache=cache
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_encoder_padding_changes_nothing(family):
    model = seq2seq(family)
    short = torch.randint(7, 96, (1, 8))
    other = torch.randint(7, 96, (1, 13))
    for side in ("right", "left"):
        pad = torch.zeros(1, 5, dtype=torch.long)
        row = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
        batch = torch.cat([row, other])
        mask = torch.ones_like(batch)
        mask[0] = row.ne(0).long()
        target = torch.randint(7, 96, (2, 6))
        with torch.no_grad():
            together = model(batch, attention_mask=mask, decoder_input_ids=target).logits
            alone = model(short, decoder_input_ids=target[:1]).logits
        torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert torch.equal(generated[:1], model.generate(short, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_labels_are_shifted_as_transformers_does(family):
    model = seq2seq(family, decoder_start_token_id=5)
    src, mask = padded_source()
    labels = torch.randint(7, 96, (2, 7))
    labels[0, -2:] = -100
    shifted = model.prepare_decoder_input_ids_from_labels(labels)
    assert torch.equal(shifted, shift_tokens_right(labels, 0, 5))
    assert shifted[0, 0] == 5 and shifted[0, -1] == 0 and torch.equal(shifted[1, 1:], labels[1, :-1])
    with torch.no_grad():
        out = model(src, attention_mask=mask, labels=labels)
        explicit = model(src, attention_mask=mask, decoder_input_ids=shifted)
        summed = model(src, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(out.logits, explicit.logits)
    # logits are aligned with the labels (no second shift), and -100 is ignored
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # Trainer's token count of the whole accumulated batch: a sum over tokens divided by it
    torch.testing.assert_close(summed, expected * labels.ne(-100).sum() / 100)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_trains_a_step(family):
    model = seq2seq(family).train()
    src, mask = padded_source(batch=4)
    labels = torch.randint(7, 96, (4, 7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = model(src, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_structure_and_config_rules(family):
    model = seq2seq(family, num_decoder_layers=3)
    assert (
        model.config.is_encoder_decoder
        and model.get_encoder() is model.encoder
        and model.get_decoder() is model.decoder
    )
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 3
    assert model.encoder.config.bidirectional and not model.decoder.config.bidirectional
    assert all(layer.cross_attn is None for layer in model.encoder.layers)
    assert all(layer.cross_attn is not None for layer in model.decoder.layers)
    shared = model.shared.weight
    assert model.encoder.embed_tokens.weight is shared and model.decoder.embed_tokens.weight is shared
    assert model.lm_head.weight is shared
    assert model.generation_config.decoder_start_token_id == model.config.bos_token_id == 2
    assert type(AutoModelForSeq2SeqLM.from_config(family.config())) is type(model)
    with pytest.raises(ValueError, match="bidirectional=False"):
        family.cls("ForConditionalGeneration")(family.config(bidirectional=True))
    with pytest.raises(Exception, match="num_decoder_layers"):
        family.config(num_decoder_layers=0)
    with pytest.raises(Exception, match="decoder_start_token_id"):
        family.config(decoder_start_token_id=96)
    with pytest.raises(TypeError, match="EncoderDecoderCache"):
        model(
            torch.randint(7, 96, (1, 5)),
            decoder_input_ids=torch.tensor([[2]]),
            cache=hf_extras.RecurrentCache(num_layers=3),
        )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_save_and_load(family, tmp_path):
    model = seq2seq(family)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and reloaded.shared.weight is reloaded.lm_head.weight
    src, mask = padded_source()
    target = torch.randint(7, 96, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(src, attention_mask=mask, decoder_input_ids=target).logits,
            model(src, attention_mask=mask, decoder_input_ids=target).logits,
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_warm_start_from_a_pretrained_causal_lm(family, tmp_path):
    """AutoModelForSeq2SeqLM on a causal-LM folder: encoder and decoder stacks and the shared embedding / LM head are
    the causal LM's weights; cross-attention (and decoder blocks beyond the source's depth) are new and initialised."""
    causal = family.cls("ForCausalLM")(family.config()).eval()
    with torch.no_grad():  # trained-looking weights, so a copy cannot pass for a fresh initialisation
        for p in causal.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    causal.save_pretrained(tmp_path / "causal")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "causal", num_decoder_layers=3)
    assert type(model) is family.cls("ForConditionalGeneration") and model.config.is_encoder_decoder
    assert all(not t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    source = causal.model.state_dict()
    torch.testing.assert_close(model.shared.weight, source["embed_tokens.weight"], rtol=0, atol=0)
    assert model.lm_head.weight is model.shared.weight
    for name in ("encoder", "decoder"):
        stack = getattr(model, name).state_dict()
        for key, value in source.items():
            torch.testing.assert_close(stack[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    # the new parts: initialised as from scratch (finite, std of the initializer range; norms at their constants)
    fresh = seq2seq(family, num_decoder_layers=3).decoder.state_dict()
    new = {k: v for k, v in model.decoder.state_dict().items() if k not in source}
    assert any(".cross_attn." in k for k in new) and any(k.startswith("layers.2.") for k in new)
    for key, value in new.items():
        assert torch.isfinite(value).all(), key
        if ".cross_attn." in key and value.dim() == 2:
            assert 0.5 < value.std().item() / model.config.initializer_range < 1.5, key
        elif ".cross_norm." in key:
            torch.testing.assert_close(value, fresh[key], msg=key)
    src, mask = padded_source()
    target = torch.randint(7, 96, (2, 5))
    loss = model.train()(src, attention_mask=mask, labels=target).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval().zero_grad()
    generated = model.generate(src, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path / "seq2seq")  # saved as an encoder-decoder, it reloads as one
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "seq2seq")
    assert torch.equal(reloaded.generate(src, attention_mask=mask, max_new_tokens=4, min_new_tokens=4), generated)


def test_warm_start_copies_an_untied_lm_head():
    family = FAMILIES[0]
    causal = family.cls("ForCausalLM")(family.config(tie_word_embeddings=False))
    model = family.cls("ForConditionalGeneration").warm_start_from(causal)
    torch.testing.assert_close(model.lm_head.weight, causal.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.shared.weight, causal.model.embed_tokens.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="own family"):
        hf_extras.DyTForConditionalGeneration.warm_start_from(causal)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_resize_token_embeddings_reaches_both_stacks(family, tmp_path):
    model = seq2seq(family)
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == model.encoder.config.vocab_size == model.decoder.config.vocab_size == 120
    src = torch.tensor([[7, 100, 119, 8]])
    target = torch.tensor([[110, 9, 119]])
    out = model(src, labels=target)
    assert out.logits.shape == (1, 3, 120) and torch.isfinite(out.loss)
    generated = model.generate(src, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == reloaded.encoder.config.vocab_size == reloaded.decoder.config.vocab_size
    assert reloaded.shared.weight.shape == (120, 32)
    assert torch.equal(reloaded.generate(src, max_new_tokens=3, min_new_tokens=3, do_sample=False), generated)


def test_remote_code_generation_from_saved_folders(tmp_path):
    """AutoModelForSeq2SeqLM + AutoTokenizer alone, in a Python that cannot import hf_extras (one family per
    modeling file, one subprocess for all)."""
    from hf_extras.data import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    texts = ["def add(a, b): return a + b", "x = 1"]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    for family in PER_MODULE:
        model = seq2seq(family, vocab_size=264)
        folder = tmp_path / family.name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert set(auto_map) == {"AutoConfig", "AutoModelForSeq2SeqLM"} | {auto.__name__ for auto in HEADS.values()}
        expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, num_beams=2, do_sample=False)
        torch.save(expected, folder / "expected.pt")

    result = run_without_hf_extras(
        f"""
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        for name in {[f.name for f in PER_MODULE]!r}:
            folder = "{tmp_path}/" + name
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
            assert "hf_extras" not in type(model).__module__, type(model).__module__
            inputs = tokenizer({texts!r}, return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, num_beams=2, do_sample=False)
            assert torch.equal(out, torch.load(folder + "/expected.pt")), (name, out)
            print("REMOTE_OK", type(model).__name__, tokenizer.batch_decode(out, skip_special_tokens=True))
        """,
        cwd=str(tmp_path),
    )
    assert result.stdout.count("REMOTE_OK") == len(PER_MODULE), result.stdout + result.stderr


# ------------------------------------------------------------------------------------------- DyT prefix LM


def prefix_lm(**overrides):
    return hf_extras.DyTForCausalLM(DYT.config(prefix_lm=True, **overrides)).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_lm_mask_semantics(attn):
    model = prefix_lm(attn_implementation=attn)
    ids = torch.randint(7, 96, (2, 12))
    prefix = torch.zeros_like(ids)
    prefix[:, :7] = 1  # 7 source tokens, 5 target tokens

    def logits(tokens):
        with torch.no_grad():
            return model(tokens, prefix_mask=prefix).logits

    base = logits(ids)
    later_target = ids.clone()
    later_target[:, 10] = (ids[:, 10] + 1 - 7) % 89 + 7
    changed = logits(later_target)
    torch.testing.assert_close(changed[:, :10], base[:, :10], rtol=0, atol=0)  # source and earlier target unchanged
    assert not torch.allclose(changed[:, 10:], base[:, 10:])
    later_source = ids.clone()
    later_source[:, 6] = (ids[:, 6] + 1 - 7) % 89 + 7
    assert not torch.allclose(logits(later_source)[:, :6], base[:, :6])  # the source attends both ways
    with torch.no_grad():
        causal = model(later_source).logits  # without prefix_mask it is a plain causal LM
        torch.testing.assert_close(causal[:, :6], model(ids).logits[:, :6], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_prefix_lm_generation(mode):
    model = prefix_lm()
    src = torch.randint(7, 96, (2, 9))
    prefix = torch.ones_like(src)
    kwargs = dict(
        do_sample=False, num_beams=3 if mode == "beam" else 1, max_new_tokens=8, min_new_tokens=8, pad_token_id=0
    )
    cached = model.generate(src, prefix_mask=prefix, use_cache=True, **kwargs)
    uncached = model.generate(src, prefix_mask=prefix, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    if mode == "greedy":  # every generated token is the argmax of one full prefix-LM pass over the result
        with torch.no_grad():
            full = model(cached, prefix_mask=prefix).logits
        assert torch.equal(full[:, 8:-1].argmax(-1), cached[:, 9:])


def test_prefix_lm_rules():
    with pytest.raises(Exception, match="prefix_lm"):
        DYT.config(prefix_lm=True, bidirectional=True)
    ids = torch.randint(7, 96, (1, 6))
    with pytest.raises(ValueError, match="prefix_lm=True"):
        hf_extras.DyTForCausalLM(DYT.config())(ids, prefix_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="prefix_lm=True"):
        hf_extras.RetNetForCausalLM(FAMILIES[0].config())(ids, prefix_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="prefix_mask"):
        prefix_lm()(ids, prefix_mask=torch.ones(1, 9, dtype=torch.long))


# ------------------------------------------------------------------------------------------- the recipe


def test_text_metrics_and_the_offline_default_data():
    from hf_extras.tasks.seq2seq import code_docstring_dataset, text_metrics

    refs = ["Return the sum of two numbers.", "Open the file for reading."]
    perfect = text_metrics(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rougeL"] == pytest.approx(100.0)
    wrong = text_metrics(["zebra quantum", "lorem ipsum"], refs)
    assert wrong["bleu"] < 1.0 and wrong["rougeL"] == 0.0

    data = code_docstring_dataset(0.2)
    assert set(data["train"]["module"]).isdisjoint(data["validation"]["module"])
    assert len(data["train"]) > 500 and len(data["validation"]) > 100
    row = data["train"][0]
    assert row["source"].startswith("def ") and row["text"] not in row["source"]


def test_seq2seq_recipe_end_to_end(tmp_path):
    from transformers import AutoTokenizer

    from hf_extras.cli import main

    out = tmp_path / "run"
    status = main([
        "train", f"{REPO}/configs/seq2seq.yaml", "--max_steps", "3", "--hidden_size", "32", "--num_heads", "2",
        "--max_train_samples", "32", "--max_eval_samples", "6", "--generation_max_length", "8",
        "--max_target_length", "16", "--output_dir", str(out), "--model_type", "hfx_mamba",
    ])  # fmt: skip
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "seq2seq" and metrics["steps"] == 3
    for key in ("final_eval_loss", "final_eval_bleu", "final_eval_rouge1", "final_eval_rougeL"):
        assert 0.0 <= metrics[key] < 1e3, key
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "HfxMambaForConditionalGeneration"
    ids = tokenizer("def f(x):\n    return x", add_special_tokens=False, return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, min_new_tokens=4).shape == (1, 5)
    # evaluation (generation with the trainer's defaults) must not pin max_length & co. in the saved model
    saved = json.loads((out / "generation_config.json").read_text())
    assert "max_length" not in saved and "top_k" not in saved, saved
    assert model.generation_config.max_length is None
