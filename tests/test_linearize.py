"""`hf_extras.convert.linearize` and the `linearize` recipe, on tiny teachers built with transformers' own classes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import REPO, run_without_hf_extras
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from hf_extras.convert import attention_transfer_loss, kl_to_teacher, linearize
from hf_extras.convert.linearize import decay_schedule, teacher_attention_io, teacher_layer_types
from hf_extras.errors import ConfigError
from hf_extras.models.hybrid import HybridAttention, attention_rotary, hybrid_masks
from hf_extras.models.positions import apply_rotary, rotary_cos_sin

TARGETS = ["hfx_gated_retention", "hfx_retnet", "hfx_gated_deltanet"]


def tiny_llama(tie: bool = False, vocab_size: int = 96, **overrides) -> LlamaForCausalLM:
    values = dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=48,
        vocab_size=vocab_size, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    values.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**values)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm that was not copied shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def tiny_mistral(sliding_window: int | None = 4, num_hidden_layers: int = 3) -> transformers.MistralForCausalLM:
    config = transformers.MistralConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=num_hidden_layers,
        intermediate_size=48, vocab_size=96, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        sliding_window=sliding_window, rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
    )  # fmt: skip
    return transformers.MistralForCausalLM(config).eval()


HYBRID = ["full_attention", "linear_attention"]


@pytest.mark.parametrize("layer_types", [None, HYBRID], ids=["linear", "hybrid"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("into", TARGETS)
def test_copied_tensors_equal_the_teachers(into, tie, layer_types):
    teacher = tiny_llama(tie=tie)
    student = linearize(teacher, into=into, layer_types=layer_types)
    kinds = layer_types or ["linear_attention"] * 2
    assert [isinstance(layer.mixer, HybridAttention) for layer in student.model.layers] == [
        kind != "linear_attention" for kind in kinds
    ]
    assert student.config.rope_theta == 500000.0  # the kept attention layers' rotary base
    group, head_dim = 2, 8
    assert student.config.norm_eps == 1e-5 and student.config.tie_word_embeddings is tie
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    for ours, theirs in zip(student.model.layers, teacher.model.layers, strict=True):
        attn = theirs.self_attn
        assert torch.equal(ours.mixer_norm.weight, theirs.input_layernorm.weight)
        assert torch.equal(ours.ffn_norm.weight, theirs.post_attention_layernorm.weight)
        assert torch.equal(ours.mixer.q_proj.weight, attn.q_proj.weight)
        assert torch.equal(ours.mixer.o_proj.weight, attn.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # query head h reads kv head h // group, head_dim rows each
            ours_w = getattr(ours.mixer, name).weight.view(4, head_dim, 32)
            theirs_w = getattr(attn, name).weight.view(2, head_dim, 32)
            for h in range(4):
                assert torch.equal(ours_w[h], theirs_w[h // group])
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(ours.ffn, name).weight, getattr(theirs.mlp, name).weight)


def test_expanded_heads_match_transformers_repeat_kv():
    """Our per-head k/v equal the teacher's after transformers' own `repeat_kv` (the order GQA uses)."""
    teacher = tiny_llama()
    student = linearize(teacher, into="hfx_gated_deltanet")
    x = torch.randn(2, 5, 32)
    for name in ("k_proj", "v_proj"):
        theirs = getattr(teacher.model.layers[0].self_attn, name)(x).view(2, 5, 2, 8).transpose(1, 2)
        ours = getattr(student.model.layers[0].mixer, name)(x).view(2, 5, 4, 8).transpose(1, 2)
        torch.testing.assert_close(ours, repeat_kv(theirs, 2), rtol=0, atol=0)


@pytest.mark.parametrize("into", ["hfx_gated_retention", "hfx_retnet"])
def test_rotary_q_k_equal_the_teachers(into):
    """Same half-split convention, rope_theta and head dim: q and k after rotary are the teacher's."""
    teacher = tiny_llama()
    student = linearize(teacher, into=into)
    assert student.config.rope_theta == 500000.0 and student.config.rotary_positions
    x = torch.randn(2, 7, 32)
    position_ids = torch.arange(3, 10)[None].expand(2, -1)
    attn, mixer = teacher.model.layers[1].self_attn, student.model.layers[1].mixer
    cos_t, sin_t = teacher.model.rotary_emb(x, position_ids)
    q_t = attn.q_proj(x).view(2, 7, 4, 8).transpose(1, 2)
    k_t = repeat_kv(attn.k_proj(x).view(2, 7, 2, 8).transpose(1, 2), 2)
    q_t, k_t = apply_rotary_pos_emb(q_t, k_t, cos_t, sin_t)
    tables = rotary_cos_sin(position_ids, student.config.head_dim, student.config.rope_theta)
    q_o = apply_rotary(mixer.feature_map(mixer.q_proj(x).view(2, 7, 4, 8).transpose(1, 2)), *tables)
    k_o = apply_rotary(mixer.feature_map(mixer.k_proj(x).view(2, 7, 4, 8).transpose(1, 2)), *tables)
    torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_o, k_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", ["head", "key"])
def test_gated_retention_starts_from_the_slow_decay_schedule(gate):
    student = linearize(tiny_llama(), into="hfx_gated_retention", gate=gate, decay_horizons=(16.0, 1024.0))
    expected = decay_schedule(4, (16.0, 1024.0))
    torch.testing.assert_close(torch.exp(-expected[[0, -1]]), torch.tensor([1 - 1 / 16, 1 - 1 / 1024]) ** -1)
    mixer = student.model.layers[0].mixer
    assert mixer.g_proj is None and mixer.conv_size == 0 and torch.equal(mixer.g_norm.weight, torch.ones(8))
    log_a = mixer.log_decay(torch.randn(2, 5, 32))  # data-independent at the start
    per_head = log_a if gate == "head" else log_a[..., 0]
    torch.testing.assert_close(per_head, expected[None, :, None].expand(2, 4, 5), rtol=1e-5, atol=1e-7)
    if gate == "key":
        assert torch.equal(log_a, log_a[..., :1].expand_as(log_a))


def test_gated_deltanet_starts_from_the_slow_decay_schedule():
    student = linearize(tiny_llama(), into="hfx_gated_deltanet")
    mixer = student.model.layers[0].mixer
    assert mixer.num_key_heads == mixer.num_heads == 4 and mixer.key_head_dim == mixer.value_head_dim == 8
    assert mixer.g_proj is None and mixer.conv_size == 0
    log_a = mixer.log_decay(torch.randn(2, 5, 32))
    torch.testing.assert_close(log_a, decay_schedule(4)[None, :, None].expand(2, 4, 5), rtol=1e-5, atol=1e-7)
    assert torch.equal(mixer.b_proj.weight, torch.zeros_like(mixer.b_proj.weight))  # beta = 0.5


def test_short_conv_override_starts_as_identity_tap():
    student = linearize(tiny_llama(), into="hfx_gated_retention", use_short_conv=True)
    weight = student.model.layers[0].mixer.conv1d.weight
    assert torch.equal(weight[..., -1], torch.ones_like(weight[..., -1])) and not weight[..., :-1].any()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ],
)
def test_refusals_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        linearize(tiny_llama(**overrides), into="hfx_gated_retention")


def test_scaled_rotary_is_accepted_by_a_target_without_rotary():
    teacher = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert linearize(teacher, into="hfx_gated_deltanet").config.model_type == "hfx_gated_deltanet"
    assert not linearize(teacher, into="hfx_gated_retention", use_rotary=False).config.use_rotary


def test_refusals_of_other_teachers_name_the_field():
    small = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                 intermediate_size=48, vocab_size=96)  # fmt: skip
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **small))
    with pytest.raises(ConfigError, match="q_norm"):
        linearize(qwen3)
    qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small))
    with pytest.raises(ConfigError, match="attention_bias"):
        linearize(qwen2)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=16, **small))
    with pytest.raises(ConfigError, match="sliding_window"):
        linearize(mistral)
    assert linearize(mistral, ignore_sliding_window=True).config.num_heads == 4
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=96))
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        linearize(gpt2)


def test_bad_arguments_name_the_field():
    teacher = tiny_llama()
    with pytest.raises(ConfigError, match="hidden_size"):
        linearize(teacher, hidden_size=64)
    with pytest.raises(ConfigError, match="hfx_mamba"):
        linearize(teacher, into="hfx_mamba")
    with pytest.raises(ConfigError, match="sliding_window"):
        linearize(teacher, sliding_window=8)  # the teacher's window, not a free field
    with pytest.raises(ConfigError, match=r"`layer_types` has 3 entries but the teacher has 2 layers"):
        linearize(teacher, layer_types=["linear_attention"] * 3)
    with pytest.raises(ConfigError, match=r"`layer_types` has unknown entries \['attention'\]"):
        linearize(teacher, layer_types=["attention", "linear_attention"])
    with pytest.raises(ConfigError, match="`layer_types`.*three to one"):
        linearize(teacher, layer_types="three to one")
    # a window the teacher does not have: "sliding without window"
    with pytest.raises(ConfigError, match=r"layers \[1\] \"sliding_attention\".*no `sliding_window`"):
        linearize(teacher, layer_types="1:1-sliding")
    with pytest.raises(ConfigError, match="head_dim"):  # our attention heads are hidden_size / heads wide
        linearize(tiny_llama(head_dim=16), into="hfx_gated_deltanet", layer_types=HYBRID)
    assert linearize(tiny_llama(head_dim=16), into="hfx_gated_deltanet").config.key_head_dim == 16
    with pytest.raises(ConfigError, match="rope_type"):  # kept attention layers rotate q/k with the default table
        scaled = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
        linearize(scaled, into="hfx_gated_deltanet", layer_types=HYBRID)


def test_teacher_layer_types_follow_the_teachers_own_attention_modules():
    """What each teacher layer is, checked against what transformers' modules do with the config."""
    small = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                 intermediate_size=48, vocab_size=96)  # fmt: skip
    for cls, config in [
        (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(use_sliding_window=True, sliding_window=8,
                                                                 max_window_layers=1, **small)),
        (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(use_sliding_window=True, sliding_window=8,
                                                                 max_window_layers=2, head_dim=8, **small)),
        (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**small)),
    ]:  # fmt: skip
        kinds, window = teacher_layer_types(config)
        modules = [layer.self_attn.sliding_window for layer in cls(config).model.layers]
        assert [window if kind == "sliding_attention" else None for kind in kinds] == modules
    # Mistral slides in every layer when a window is set and ignores a `layer_types` entry; Llama never slides
    mistral = transformers.MistralConfig(sliding_window=8, layer_types=["full_attention"] * 3, **small)
    assert teacher_layer_types(mistral) == (["sliding_attention"] * 3, 8)
    assert teacher_layer_types(transformers.MistralConfig(sliding_window=None, **small)) == (
        ["full_attention"] * 3,
        None,
    )
    llama = transformers.LlamaConfig(layer_types=["sliding_attention"] * 3, sliding_window=8, **small)
    assert teacher_layer_types(llama) == (["full_attention"] * 3, None)


def test_sliding_teacher_maps_to_sliding_layers_or_is_refused():
    """A teacher's sliding layer is kept exactly as "sliding_attention"; made linear or full it sees the whole past,
    refused unless `ignore_sliding_window` (the pure case as before hybrids)."""
    teacher = tiny_mistral(sliding_window=4)
    linear, full = r"\['linear_attention'\]", r"\['full_attention'\]"
    for refused, layers, kinds in [
        (None, r"\[0, 1, 2\]", linear),
        ("1:1", r"\[0, 1, 2\]", r"\['full_attention', 'linear_attention'\]"),
        ("1:1-sliding", r"\[0, 2\]", linear),
        (["sliding_attention", "full_attention", "sliding_attention"], r"\[1\]", full),
    ]:
        expected = rf"layers {layers} .*sliding_window=4.*makes them {kinds}.*ignore_sliding_window"
        with pytest.raises(ConfigError, match=expected):
            linearize(teacher, into="hfx_gated_deltanet", layer_types=refused)
    exact = linearize(teacher, into="hfx_gated_deltanet", layer_types=["sliding_attention"] * 3)
    assert exact.config.sliding_window == 4 and all(layer.mixer.sliding_window == 4 for layer in exact.model.layers)
    student = linearize(teacher, into="hfx_gated_deltanet", layer_types="1:1-sliding", ignore_sliding_window=True)
    assert student.config.layer_types == ["linear_attention", "sliding_attention", "linear_attention"]
    assert student.config.sliding_window == 4 and student.model.layers[1].mixer.sliding_window == 4
    accepted = linearize(teacher, into="hfx_gated_deltanet", layer_types="1:1", ignore_sliding_window=True)
    assert accepted.config.layer_types[1] == "full_attention" and accepted.config.sliding_window is None


@pytest.mark.parametrize("layer_types", [None, "1:1"], ids=["linear", "hybrid"])
@pytest.mark.parametrize("into", TARGETS)
def test_saved_copy_runs_every_head(into, layer_types, tmp_path):
    teacher = tiny_llama()
    student = linearize(teacher, into=into, layer_types=layer_types)
    student.save_pretrained(tmp_path)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        expected = student(ids).logits
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        hidden = transformers.AutoModel.from_pretrained(tmp_path)(ids).last_hidden_state
        assert hidden.shape == (2, 9, 32)
        for auto, shape in [
            (transformers.AutoModelForSequenceClassification, (2, 3)),
            (transformers.AutoModelForTokenClassification, (2, 9, 3)),
        ]:
            model = auto.from_pretrained(tmp_path, num_labels=3).eval()
            assert torch.equal(model.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
            assert model(ids).logits.shape == shape
        qa = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
        assert qa(ids).start_logits.shape == (2, 9)


@pytest.mark.parametrize("into", TARGETS)
def test_all_full_attention_gives_the_teachers_logits(into):
    """Every layer kept: the copy is the teacher (eager ours vs the teacher's SDPA), padded or not, and generates
    the teacher's tokens."""
    teacher = tiny_llama(num_hidden_layers=3)
    student = linearize(teacher, into=into, layer_types=["full_attention"] * 3)
    ids = torch.randint(3, 96, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: both count positions from 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = teacher(ids, attention_mask=attention_mask).logits
            got = student(ids, attention_mask=attention_mask).logits
            keep = slice(None) if attention_mask is None else attention_mask.bool()
            torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :6]
    assert torch.equal(
        student.generate(prompt, max_new_tokens=8, do_sample=False),
        teacher.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
    )


@pytest.mark.parametrize("into", ["hfx_gated_retention", "hfx_gated_deltanet"])
def test_all_sliding_attention_gives_a_sliding_teachers_logits(into):
    """Mistral with a window shorter than the text: its sliding layers map exactly onto ours (window copied)."""
    teacher = tiny_mistral(sliding_window=4)
    student = linearize(teacher, into=into, layer_types=["sliding_attention"] * 3)
    ids = torch.randint(3, 96, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    wider = linearize(teacher, into=into, layer_types=["full_attention"] * 3, ignore_sliding_window=True)
    with torch.no_grad():  # the check has teeth: without the window the logits differ past it
        assert (wider(ids).logits - teacher(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("make_teacher", "layer_types"),
    [(lambda: tiny_llama(num_hidden_layers=3), "1:1"), (lambda: tiny_mistral(sliding_window=4), "1:1-sliding")],
    ids=["llama_full", "mistral_sliding"],
)
@pytest.mark.parametrize("into", TARGETS)
def test_kept_attention_layers_give_the_teachers_layer_outputs(into, make_teacher, layer_types):
    """In a mixed schedule, each attention layer given the teacher's input to that layer gives its output."""
    teacher = make_teacher()
    student = linearize(teacher, into=into, layer_types=layer_types, ignore_sliding_window=True)
    kept = [i for i, kind in enumerate(student.config.layer_types) if kind != "linear_attention"]
    assert kept == [1]
    ids = torch.randint(3, 96, (2, 13))
    position_ids = torch.arange(13)[None].expand(2, -1)
    inputs, outputs = teacher_attention_io(teacher, ids, None, position_ids)
    tables = attention_rotary(student.config, position_ids)
    for i in kept:
        kind = student.config.layer_types[i]
        mask = hybrid_masks(student.config, None, inputs[i], None)[kind]
        with torch.no_grad():
            got = student.model.layers[i].mixer(inputs[i], attention_mask=mask, position_embeddings=tables)
        torch.testing.assert_close(got, outputs[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("into", TARGETS)
def test_hybrid_copy_generates_the_same_with_and_without_cache(into, mode):
    teacher = tiny_mistral(sliding_window=4, num_hidden_layers=4)
    schedule = ["linear_attention", "sliding_attention"] * 2
    student = linearize(teacher, into=into, layer_types=schedule, ignore_sliding_window=True)
    ids = torch.randint(3, 96, (2, 9))  # longer than the window
    kwargs = dict(do_sample=False) if mode == "greedy" else dict(num_beams=3, do_sample=False)
    outs = [student.generate(ids, max_new_tokens=8, use_cache=c, pad_token_id=0, **kwargs) for c in (True, False)]
    assert outs[0].shape == (2, 17) and torch.equal(outs[0], outs[1])


def test_attention_transfer_loss_is_zero_on_itself_and_reaches_only_mixers():
    teacher = tiny_llama()
    student = linearize(teacher, into="hfx_gated_retention")
    ids = torch.randint(3, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding counts nothing
    losses = attention_transfer_loss(student, teacher, ids, mask)
    assert losses.shape == (2,) and bool((losses > 0).all())
    losses.sum().backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".mixer." in n for n in grads)


def test_attention_transfer_skips_kept_attention_layers():
    teacher = tiny_llama(num_hidden_layers=3)
    student = linearize(teacher, into="hfx_gated_deltanet", layer_types=["linear_attention", "full_attention",
                                                                           "linear_attention"])  # fmt: skip
    ids = torch.randint(3, 96, (2, 12))
    losses = attention_transfer_loss(student, teacher, ids)
    assert losses.shape == (2,) and bool((losses > 0).all())  # layers 0 and 2
    losses.sum().backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith(("model.layers.0.mixer.", "model.layers.2.mixer.")) for n in grads), grads
    with pytest.raises(ConfigError, match="stage1_steps"):
        attention_transfer_loss(linearize(teacher, layer_types=["full_attention"] * 3), teacher, ids)


def tiny_blocks(n: int, length: int = 16, vocab: int = 96) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def stage1(student, teacher, tmp_path, steps: int = 8) -> dict:
    """`run_attention_transfer` for `steps` steps at lr 1e-2 on 16 random blocks (evaluated on 8 of them)."""
    from hf_extras.tasks.causal_lm import causal_lm_collator
    from hf_extras.tasks.linearize import run_attention_transfer
    from hf_extras.training import load_tokenizer

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    data = tiny_blocks(16, vocab=264)
    collator = causal_lm_collator(load_tokenizer(None))
    return run_attention_transfer(student, teacher, data, data.select(range(8)), collator, args, steps, 1e-2)


def test_stage1_lowers_every_layers_mse_and_freezes_the_rest(tmp_path):
    teacher = tiny_llama(vocab_size=264)
    student = linearize(teacher, into="hfx_gated_retention").train()
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".mixer." not in n}
    metrics = stage1(student, teacher, tmp_path)
    before, after = metrics["stage1_initial_layer_mse"], metrics["stage1_final_layer_mse"]
    assert len(before) == len(after) == 2
    assert all(b > a for b, a in zip(before, after, strict=True)), (before, after)
    for name, param in student.named_parameters():
        assert param.requires_grad, name  # restored for stage 2
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_stage1_on_a_hybrid_trains_only_the_linear_layers(tmp_path):
    """The kept attention layer is frozen and not reported; the linear layers' MSE falls."""
    from hf_extras.tasks.linearize import stage1_parameters

    teacher = tiny_llama(vocab_size=264, num_hidden_layers=3)
    student = linearize(teacher, into="hfx_gated_retention", layer_types="1:1").train()
    attention = {n: p.detach().clone() for n, p in student.model.layers[1].named_parameters()}
    metrics = stage1(student, teacher, tmp_path)
    assert metrics["stage1_layers"] == [0, 2]
    before, after = metrics["stage1_initial_layer_mse"], metrics["stage1_final_layer_mse"]
    assert len(before) == len(after) == 2
    assert all(b > a for b, a in zip(before, after, strict=True)), (before, after)
    for name, param in student.model.layers[1].named_parameters():
        assert torch.equal(param, attention[name]), name
    linear_mixers = {
        f"model.layers.{i}.mixer.{n}" for i in (0, 2) for n, _ in student.model.layers[i].mixer.named_parameters()
    }
    assert set(stage1_parameters(student)) == linear_mixers
    copied = ("q_proj", "k_proj", "v_proj", "o_proj")
    new_only = {n for n in linear_mixers if n.split(".")[-2] not in copied}
    assert set(stage1_parameters(student, "new")) == new_only and new_only


def test_kl_to_teacher_matches_torch_kl_div():
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3:] = -100
    keep = labels[:, 1:] != -100
    t, s = F.log_softmax(teacher[:, :-1] / 2.0, -1), F.log_softmax(student[:, :-1] / 2.0, -1)
    expected = 4.0 * F.kl_div(s[keep], t[keep], log_target=True, reduction="batchmean")
    torch.testing.assert_close(kl_to_teacher(student, teacher, labels, temperature=2.0), expected)
    assert kl_to_teacher(teacher, teacher, labels).abs() < 1e-6


def test_distillation_step_is_the_same_with_gradient_accumulation(tmp_path):
    """KL + LM loss normalised over the accumulated batch: 1 x 4 and 2 x 2 give the same update."""
    from hf_extras.tasks.causal_lm import causal_lm_collator
    from hf_extras.tasks.linearize import DistillationTrainer
    from hf_extras.training import load_tokenizer

    teacher = tiny_llama(vocab_size=264)
    data = tiny_blocks(4, vocab=264)
    data = data.map(
        lambda row, i: {"attention_mask": [1] * (16 - 3 * (i % 2)) + [0] * (3 * (i % 2))}, with_indices=True
    )
    collator = causal_lm_collator(load_tokenizer(None))
    params = []
    for batch, accumulation in [(4, 1), (2, 2)]:
        student = linearize(teacher, into="hfx_gated_retention").train()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"b{batch}"), use_cpu=True, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1, optim="sgd",
            lr_scheduler_type="constant", report_to="none", save_strategy="no", seed=0,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, args=args, train_dataset=data, data_collator=collator, teacher=teacher, kl_weight=2.0,
            temperature=1.5,
        )  # fmt: skip
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-6)


def test_into_selects_the_model_type_and_its_keys(tmp_path):
    from hf_extras.cli import parse_train_args

    config = f"{REPO}/configs/linearize.yaml"
    args = parse_train_args(config, ["--into", "hfx_gated_deltanet", "--gate", "none"])
    assert args.model_type == "hfx_gated_deltanet" and args.model_overrides == {"gate": "none"}
    assert args.task.into == "hfx_gated_deltanet" and args.task.stage2_steps == 200


@pytest.fixture
def teacher_folder(tmp_path):
    from hf_extras.training import load_tokenizer

    tokenizer = load_tokenizer(None)
    teacher = tiny_llama(vocab_size=264, pad_token_id=tokenizer.pad_token_id)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def recipe(teacher_folder, out, *extra: str) -> int:
    from hf_extras.cli import main

    return main(
        ["train", f"{REPO}/configs/linearize.yaml", "--teacher_model_name_or_path", str(teacher_folder),
         "--output_dir", str(out), "--stage1_steps", "3", "--stage2_steps", "2", "--block_size", "16",
         "--max_train_samples", "16", "--max_eval_samples", "4", "--per_device_train_batch_size", "4",
         "--eval_steps", "2", "--logging_steps", "1", "--sample_max_new_tokens", "4", *extra]
    )  # fmt: skip


def assert_loads_without_hf_extras(out, tmp_path, check: str = "") -> None:
    """The run folder `out` loads with `trust_remote_code=True` where hf_extras cannot be imported, gives the logits
    it gives here, and runs `check` (Python on `model`) there."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 264, (1, 10))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    result = run_without_hf_extras(
        f"""
        import torch
        try:
            import hf_extras
            raise SystemExit("hf_extras must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = torch.load("{tmp_path}/expected.pt")
        model = AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True).eval()
        assert "hf_extras" not in type(model).__module__, type(model).__module__
        {check}
        with torch.no_grad():
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], rtol=0, atol=0)
        AutoTokenizer.from_pretrained("{out}")
        print("REMOTE_OK")
        """,
        cwd=str(tmp_path),
    )
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr


def test_recipe_runs_end_to_end_and_loads_without_hf_extras(teacher_folder, tmp_path):
    out = tmp_path / "run"
    assert recipe(teacher_folder, out, "--kl_weight", "0.5") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "linearize" and metrics["model_type"] == "hfx_gated_retention"
    for key in ("teacher_eval_loss", "linearized_eval_loss", "initial_eval_loss", "final_eval_loss"):
        assert metrics[key] > 0, key
    assert metrics["stage1_final_mse"] < metrics["stage1_initial_mse"]
    assert len(metrics["stage1_final_layer_mse"]) == 2 and metrics["steps"] == 2
    assert not (out / "stage1").exists()
    assert_loads_without_hf_extras(out, tmp_path)


def test_recipe_with_a_hybrid_schedule_loads_without_hf_extras(teacher_folder, tmp_path):
    out = tmp_path / "hybrid"
    assert recipe(teacher_folder, out, "--into", "hfx_gated_deltanet", "--layer_types", "1:1") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage1_layers"] == [0] and len(metrics["stage1_final_layer_mse"]) == 1
    assert metrics["stage1_final_mse"] < metrics["stage1_initial_mse"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.layer_types == ["linear_attention", "full_attention"]
    assert model.config.rope_theta == 500000.0
    assert_loads_without_hf_extras(
        out, tmp_path, 'assert type(model.model.layers[1].mixer).__name__ == "HybridAttention"'
    )


@pytest.mark.parametrize("into", ["hfx_gated_retention", "hfx_gated_deltanet"])
def test_recipe_with_a_softmax_window_loads_without_hf_extras(teacher_folder, tmp_path, into):
    """`--attention_window` (a config key of the target) reaches the student; stage 1 trains through the window."""
    out = tmp_path / "window"
    assert recipe(teacher_folder, out, "--into", into, "--attention_window", "4") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage1_final_mse"] < metrics["stage1_initial_mse"]
    assert transformers.AutoConfig.from_pretrained(out).attention_window == 4
    assert_loads_without_hf_extras(out, tmp_path, "assert model.config.attention_window == 4")


def test_recipe_all_attention_skips_stage_one(teacher_folder, tmp_path):
    out = tmp_path / "all"
    layer_types = ["--layer_types", "full_attention", "full_attention"]
    assert recipe(teacher_folder, out, "--stage2_steps", "1", "--kl_weight", "0", *layer_types) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage1_steps"] == 0 and metrics["stage1_layers"] == []
    assert abs(metrics["linearized_eval_loss"] - metrics["teacher_eval_loss"]) < 1e-4  # the copy is the teacher


def test_recipe_checks_layer_types_when_parsing(teacher_folder):
    from hf_extras.cli import parse_train_args

    config = f"{REPO}/configs/linearize.yaml"
    teacher = ["--teacher_model_name_or_path", str(teacher_folder)]
    args = parse_train_args(config, [*teacher, "--layer_types", "1:1"])
    assert args.task.layer_types == ["1:1"] and "layer_types" not in args.model_overrides
    for bad, message in [
        (["linear_attention"] * 3, "has 3 entries but the teacher has 2 layers"),
        (["linear_attention", "global"], "unknown entries"),
        (["linear_attention", "sliding_attention"], "no `sliding_window`"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_train_args(config, [*teacher, "--layer_types", *bad])


def test_recipe_with_lora_in_stage_two(teacher_folder, tmp_path):
    from hf_extras.finetune import load_finetuned

    out = tmp_path / "lora"
    assert recipe(teacher_folder, out, "--into", "hfx_gated_deltanet", "--finetune_method", "lora") == 0
    assert (out / "adapter_config.json").is_file() and (out / "base_model" / "config.json").is_file()
    model = load_finetuned(out, transformers.AutoModelForCausalLM)
    assert model.config.model_type == "hfx_gated_deltanet"
    assert model(torch.randint(3, 264, (1, 6))).logits.shape == (1, 6, 264)


def test_recipe_refuses_missing_teacher_and_conflicting_lengths(teacher_folder, tmp_path, capsys):
    from hf_extras.cli import main

    config = f"{REPO}/configs/linearize.yaml"
    assert main(["train", config, "--output_dir", str(tmp_path / "a"), "--max_train_samples", "4"]) == 2
    assert "teacher_model_name_or_path" in capsys.readouterr().err
    assert recipe(teacher_folder, tmp_path / "b", "--max_steps", "5") == 2
    assert "stage2_steps" in capsys.readouterr().err
