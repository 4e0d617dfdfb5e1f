"""`pipeline()` and the Auto classes on saved folders: the prompt the model was trained on, and no interactive
"Do you wish to run the custom code?" question for a folder hf_extras serves."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO
from families import FAMILIES, HEADS
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_extras
from hf_extras.cli import main
from hf_extras.data import build_byte_tokenizer
from hf_extras.data.tokenizer import CLS_TOKEN_ID, SEP_TOKEN_ID, tokenizer_for_task

# configs/quickstart.yaml shrunk to seconds on a CPU
TINY_RUN = [
    "--max_steps", "3", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_heads", "2",
    "--block_size", "32", "--max_train_samples", "96", "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_strategy", "no",
    "--logging_steps", "1", "--warmup_steps", "1", "--sample_max_new_tokens", "4", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    assert main(["train", f"{REPO}/configs/quickstart.yaml", *TINY_RUN, f"--output_dir={out}"]) == 0
    return out


def test_text_generation_pipeline_equals_generate_on_a_causal_lm_run_folder(causal_run):
    prompt = "def add(a, b):\n    return"
    tokenizer = AutoTokenizer.from_pretrained(causal_run)
    plain = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    # the run folder's tokenizer adds nothing to a plain prompt (no <cls> ... <sep> around it)
    assert tokenizer(prompt).input_ids == plain.input_ids[0].tolist()
    generator = transformers.pipeline("text-generation", model=str(causal_run))
    assert torch.equal(generator.preprocess(prompt)["input_ids"], plain.input_ids)

    model = AutoModelForCausalLM.from_pretrained(causal_run).eval()
    with torch.no_grad():
        expected = model.generate(**plain, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    completion = tokenizer.decode(expected[0, plain.input_ids.shape[1] :], skip_special_tokens=True)
    out = generator(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == completion


def test_encoder_tasks_keep_cls_sep_and_generation_tasks_read_plain_text(causal_run):
    saved = AutoTokenizer.from_pretrained(causal_run)  # plain, as a causal-LM run saved it
    for task in ("question_answering", "sequence_classification", "token_classification", "masked_lm"):
        encoder = tokenizer_for_task(saved, task)
        assert encoder("ab").input_ids == [CLS_TOKEN_ID, 104, 105, SEP_TOKEN_ID], task
        assert encoder("ab", "c").input_ids == [CLS_TOKEN_ID, 104, 105, SEP_TOKEN_ID, 106, SEP_TOKEN_ID], task
        assert tokenizer_for_task(encoder, task) is encoder  # already right: no copy
    assert saved("ab").input_ids == [104, 105]  # the loaded one is not changed in place
    default = build_byte_tokenizer()
    for task in ("causal_lm", "seq2seq"):
        assert tokenizer_for_task(default, task)("ab", "c").input_ids == [104, 105, 106]
    assert default("ab").input_ids == [CLS_TOKEN_ID, 104, 105, SEP_TOKEN_ID]
    assert build_byte_tokenizer(cls_sep=False)("ab").input_ids == [104, 105]
    other = object()  # not the byte tokenizer: left alone
    assert tokenizer_for_task(other, "causal_lm") is other


# ------------------------------------------------------------------------------------------------------------------
# no interactive remote-code question for folders hf_extras serves
# ------------------------------------------------------------------------------------------------------------------

# one family per modeling file
PER_MODULE = [f for f in FAMILIES if f.name in ("retnet", "gla", "dyt", "mamba")]
TEXT_PIPELINES = {
    "ForCausalLM": ["text-generation", "feature-extraction"],
    "ForSequenceClassification": ["text-classification"],
    "ForTokenClassification": ["token-classification"],
    "ForMaskedLM": ["fill-mask"],
    "ForQuestionAnswering": ["question-answering"],
    "ForConditionalGeneration": [],  # transformers 5 removed text2text-generation
}
PROCESSOR_AUTOS = ["AutoConfig", "AutoTokenizer", "AutoImageProcessor", "AutoFeatureExtractor", "AutoProcessor"]


@pytest.fixture
def prompts(monkeypatch):
    """Every call of `input()` (transformers' remote-code question) is recorded and answered with an error."""
    asked = []

    def no_input(prompt=""):
        asked.append(prompt)
        raise EOFError("stdin is closed")

    monkeypatch.setattr(builtins, "input", no_input)
    return asked


def _load_quietly(loader, *args, **kwargs):
    """Call a loader; a refusal (no such processor for this folder) is fine, a question is not."""
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None


def _video_auto():
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    return AutoVideoProcessor


@pytest.mark.parametrize("family", PER_MODULE, ids=lambda f: f.name)
def test_no_remote_code_question_for_sequence_family_folders(family, tmp_path, prompts):
    tokenizer = build_byte_tokenizer()
    for head, tasks in TEXT_PIPELINES.items():
        bidirectional = head in ("ForMaskedLM", "ForQuestionAnswering", "ForTokenClassification")
        model = family.cls(head)(family.config(vocab_size=264, num_labels=3, bidirectional=bidirectional))
        folder = str(tmp_path / head)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for auto in [*HEADS.values(), transformers.AutoModelForSeq2SeqLM]:
            _load_quietly(auto.from_pretrained, folder)
        for name in PROCESSOR_AUTOS:
            _load_quietly(getattr(transformers, name).from_pretrained, folder)
        _load_quietly(_video_auto().from_pretrained, folder)
        for task in tasks:
            assert transformers.pipeline(task, model=folder) is not None
        assert prompts == [], (head, prompts)


def test_no_remote_code_question_for_mlp_mixer_folders(tmp_path, prompts):
    """transformers 5.25's pipeline() also looks for a video processor named after the image processor's auto_map."""
    from PIL import Image

    config = hf_extras.MlpMixerConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, tokens_mlp_dim=24, channels_mlp_dim=64,
        num_labels=3,
    )  # fmt: skip
    folder = str(tmp_path / "mixer")
    hf_extras.MlpMixerForImageClassification(config).save_pretrained(folder)
    hf_extras.MlpMixerImageProcessor.from_model_config(config).save_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    for auto in (transformers.AutoModel, transformers.AutoModelForImageClassification):
        _load_quietly(auto.from_pretrained, folder)
    for name in PROCESSOR_AUTOS:
        _load_quietly(getattr(transformers, name).from_pretrained, folder)
    _load_quietly(_video_auto().from_pretrained, folder)
    assert len(transformers.pipeline("image-classification", model=folder)(image, top_k=2)) == 2
    assert transformers.pipeline("image-feature-extraction", model=folder) is not None
    assert prompts == [], prompts

    text = tmp_path / "mixer_text"  # text mode (fixed-length token sequences)
    text_config = hf_extras.MlpMixerConfig(
        modality="text", vocab_size=264, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2, tokens_mlp_dim=24,
        channels_mlp_dim=64, num_labels=3,
    )  # fmt: skip
    hf_extras.MlpMixerForSequenceClassification(text_config).save_pretrained(text)
    build_byte_tokenizer().save_pretrained(text)
    assert transformers.pipeline("text-classification", model=str(text)) is not None
    assert prompts == [], prompts
