"""Hymba checkpoints in transformers (no trust_remote_code): same logits as ours, same greedy text in a pipeline."""

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file

pytest.importorskip("transformers", minversion="5")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

import hymba.integrations.transformers  # noqa: E402, F401  (registers model_type "hymba")
from hymba.config import HymbaConfig  # noqa: E402
from hymba.generate import complete, generate  # noqa: E402
from hymba.model import HymbaForCausalLM  # noqa: E402
from hymba.tokenizer import HymbaTokenizer, default_tokenizer_dir  # noqa: E402

# The released config.json points at remote code; loading must not need (or ask for) it.
RELEASED_AUTO_MAP = {"AutoConfig": "configuration_hymba.HymbaConfig",
                     "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", auto_map=RELEASED_AUTO_MAP)).eval()
    model.init_weights()
    path = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(path, copy_side_files_from=default_tokenizer_dir())
    return model, path


def test_auto_classes_load_our_weights_with_our_logits(checkpoint):
    ours, path = checkpoint
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "hymba"
    theirs = config.to_hymba().to_dict()
    theirs.pop("transformers_version")  # transformers stamps its own version; our config omits a null one
    assert theirs == ours.config.to_dict()
    theirs = AutoModelForCausalLM.from_pretrained(path)
    assert type(theirs).__name__ == "HymbaForCausalLMHF"
    ids = torch.tensor([[1, 450, 7483, 310, 3444, 338], [0, 0, 1, 15043, 29892, 3186]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        # Same modules, same weights: equal to the bit, padded rows included.
        assert torch.equal(theirs(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)
        labels = ids.masked_fill(mask == 0, -100)
        assert torch.equal(theirs(ids, attention_mask=mask, labels=labels).loss,
                           ours(ids, attention_mask=mask, labels=labels).loss)


def test_meta_tokens_and_ssm_constants_survive_loading(checkpoint):
    ours, path = checkpoint
    theirs = AutoModelForCausalLM.from_pretrained(path)
    # transformers initialises what it did not load; nothing may be missed (A_log, D, meta tokens included).
    for name, tensor in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()  # tied as released


def test_pipeline_greedy_text_equals_complete(checkpoint):
    ours, path = checkpoint
    generator = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(path),
                         tokenizer=AutoTokenizer.from_pretrained(path))
    tokenizer = HymbaTokenizer.from_pretrained(path)
    prompts = ["Once upon a time", "The capital of France is"]
    for prompt, text in zip(prompts, complete(ours, tokenizer, prompts, max_new_tokens=8)):
        ids = generator(prompt, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        assert ids == generate(ours, [prompt], tokenizer=tokenizer, max_new_tokens=8)[0].tolist()
        out = generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
        # The pipeline decodes the new tokens alone, so SentencePiece drops the first word's space;
        # `complete` reads them after the prompt and keeps it.
        assert out == text.removeprefix(" ")


def test_released_format_checkpoint_gives_the_released_logits(official_tiny_dir):
    """A checkpoint written by the released code (config.json with its auto_map) loads without remote code."""
    ref = load_file(official_tiny_dir / "reference.safetensors")
    model = AutoModelForCausalLM.from_pretrained(official_tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(model(ref["input_ids"]).logits, ref["logits"]) < 1e-4  # as tests/test_model.py
