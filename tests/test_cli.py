"""The `hymba` command end to end, in subprocesses, on a tiny checkpoint."""

import subprocess
import sys

import pytest
import torch

from hymba.config import HymbaConfig
from hymba.model import HymbaForCausalLM
from hymba.tokenizer import default_tokenizer_dir


def hymba(*args, input=None):
    return subprocess.run([sys.executable, "-m", "hymba.cli", *args], capture_output=True, text=True, input=input,
                          timeout=120)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny"))
    model.init_weights()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path, copy_side_files_from=default_tokenizer_dir())
    return path


def test_help_lists_every_command():
    out = hymba("--help")
    assert out.returncode == 0
    for command in ("generate", "chat", "bench", "data", "train", "eval"):
        assert command in out.stdout


def test_generate_streams_text(tiny_checkpoint):
    out = hymba("generate", "--model", str(tiny_checkpoint), "Once upon a time", "--max-new-tokens", "8",
                "--seed", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time") and len(out.stdout) > len("Once upon a time\n")


def test_generate_batch_file(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat\nA much longer prompt about the weather today\n")
    out = hymba("generate", "--model", str(tiny_checkpoint), "--batch-file", str(prompts), "--max-new-tokens", "5",
                "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("---") == 2


def test_chat_answers_and_exits(tiny_checkpoint):
    out = hymba("chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "5", input="Hello!\n\n")
    assert out.returncode == 0, out.stderr
    assert "hymba>" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/dir", "hi"], "no checkpoint directory"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
])
def test_bad_input_is_one_line(args, message):
    out = hymba(*args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_too_long_prompt_is_one_line(tiny_checkpoint):
    out = hymba("generate", "--model", str(tiny_checkpoint), "word " * 400, "--max-new-tokens", "4")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "exceed" in out.stderr


def test_tokenizer_that_does_not_fit_the_model_is_one_line(official_tiny_dir):
    out = hymba("generate", "--model", str(official_tiny_dir), "hello world", "--max-new-tokens", "4")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "vocabulary" in out.stderr and out.stdout == ""
