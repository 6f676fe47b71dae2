"""Every `hymba` subcommand on a table of bad input: exit 2 and one error line, never a traceback (issue 20).

The rows run in this process through `hymba.cli.main`, since a subprocess per row would spend seconds importing
torch: an exception escaping `main` is exactly what would print a traceback, and fails the row. What depends on the
real process (how stdin is decoded, a reader that closes the pipe) runs in subprocesses at the end.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hymba.cli import main
from hymba.config import HymbaConfig
from hymba.model import HymbaForCausalLM
from hymba.tokenizer import default_tokenizer_dir
from hymba.train.data import FORMAT, META_FILE

# A row that got past its check could start a server or a long run: fail it instead of waiting.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """The files the rows name, by placeholder: checkpoints (sound and damaged), token folders, prompt files."""
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny"))
    model.init_weights()
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt, copy_side_files_from=default_tokenizer_dir())

    def damaged(name: str, file: str, content: bytes | None) -> None:
        shutil.copytree(ckpt, root / name)
        (root / name / file).unlink() if content is None else (root / name / file).write_bytes(content)

    damaged("truncated", "model.safetensors", (ckpt / "model.safetensors").read_bytes()[:5000])
    damaged("config-list", "config.json", b"[1, 2]")
    damaged("global-int", "config.json", json.dumps({**json.loads((ckpt / "config.json").read_text()),
                                                     "global_attn_idx": 5}).encode())
    model.save_pretrained(root / "sharded", max_shard_bytes=3_000_000)
    sorted((root / "sharded").glob("model-00001-of-*.safetensors"))[0].unlink()

    tokens = root / "tokens"
    tokens.mkdir()
    for split, n in (("train", 4000), ("val", 600)):
        np.random.default_rng(0).integers(3, 500, n).astype(np.uint16).tofile(tokens / f"{split}.bin")
    # meta.json claims a vocabulary of 64 (as a file from another tool might): the ids go up to 499
    meta = {"format": FORMAT, "dtype": "uint16", "vocab_size": 64, "bos_id": 1, "eos_id": 2,
            "train_tokens": 4000, "val_tokens": 600}
    (tokens / META_FILE).write_text(json.dumps(meta))
    shutil.copytree(tokens, root / "bad-meta")
    (root / "bad-meta" / META_FILE).write_text('{"format": "hymba-tok')

    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "empty.txt").write_text("\n\n")
    (root / "prompts.txt").write_text("The cat\nThe dog\n")
    (root / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100)[:40])

    # A finished 2-step run to resume, and copies whose trainer state or weights are cut short.
    train = ["train", "--config", "tiny-cpu", "--data-dir", str(tokens), "--no-progress", "--block-size", "32",
             "--batch-size", "2", "--max-steps", "2"]
    assert main([*train, "--out", str(root / "run")]) == 0
    shutil.copytree(root / "run", root / "run-cut")
    state = root / "run-cut" / "step-0000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    shutil.copytree(root / "run", root / "run-cut-weights")
    weights = root / "run-cut-weights" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {"root": str(root), "ckpt": str(ckpt), "tokens": str(tokens)} | {
        name: str(root / name) for name in ("truncated", "config-list", "global-int", "sharded", "bad-meta",
                                            "latin1.txt", "empty.txt", "prompts.txt", "bad.jsonl.gz", "cut.jsonl.gz",
                                            "run", "run-cut", "run-cut-weights")}


def fill(arg: str, paths: dict[str, str]) -> str:
    """`arg` with each {placeholder} replaced by its path (str.format would trip over JSON arguments)."""
    for name, path in paths.items():
        arg = arg.replace("{" + name + "}", path)
    return arg


TRAIN = ["train", "--config", "tiny-cpu", "--data-dir", "{tokens}", "--out", "{root}/never", "--no-progress",
         "--max-steps", "1"]
RESUME = ["train", "--config", "tiny-cpu", "--data-dir", "{tokens}", "--no-progress", "--block-size", "32",
          "--batch-size", "2", "--resume"]

# (argv, what the error line must say, a path the failed command must not create). stdin for `chat` is below.
ROWS = {
    # generate
    "generate: unknown device": (["generate", "hi", "--device", "tpu"], "unknown device 'tpu'", None),
    "generate: NaN temperature": (["generate", "hi", "--temperature", "nan"], "temperature must be", None),
    "generate: seed past 64 bits": (["generate", "hi", "--seed", str(2**70)], "seed must be an integer", None),
    "generate: no prompt": (["generate"], "give a prompt", None),
    "generate: prompt and batch file": (["generate", "hi", "--batch-file", "{prompts.txt}"], "not both", None),
    "generate: non-UTF-8 prompt": (["generate", "caf\udce9"], "the prompt is not UTF-8", None),
    "generate: non-UTF-8 batch file": (["generate", "--batch-file", "{latin1.txt}"], "is not UTF-8 text", None),
    "generate: empty batch file": (["generate", "--batch-file", "{empty.txt}"], "has no prompts", None),
    "generate: batch file a folder": (["generate", "--batch-file", "{root}"], "is a directory", None),
    "generate: missing batch file": (["generate", "--batch-file", "{root}/absent.txt"], "does not exist", None),
    "generate: missing checkpoint": (["generate", "hi", "--model", "{root}/absent"], "no checkpoint directory", None),
    "generate: truncated weights": (["generate", "hi", "--model", "{truncated}"], "not a readable safetensors", None),
    "generate: config a list": (["generate", "hi", "--model", "{config-list}"], "JSON object", None),
    "generate: global layers an int": (["generate", "hi", "--model", "{global-int}"], "global_attn_idx", None),
    "generate: shard missing": (["generate", "hi", "--model", "{sharded}"], "names shard(s) that are not", None),
    "generate: too long": (["generate", "hi", "--max-new-tokens", "100000"], "exceed the model's", None),
    "generate: not an int (argparse)": (["generate", "hi", "--max-new-tokens", "many"], "invalid int value", None),
    # chat
    "chat: unknown device": (["chat", "--device", "tpu"], "unknown device 'tpu'", None),
    "chat: truncated weights": (["chat", "--model", "{truncated}"], "not a readable safetensors", None),
    "chat: non-UTF-8 input": (["chat", "--max-new-tokens", "2"], "the input is not UTF-8", None),
    # bench
    "bench: unknown device": (["bench", "--device", "tpu"], "unknown device 'tpu'", None),
    "bench: unknown model": (["bench", "--models", "gpt-5"], "unknown model(s) gpt-5", None),
    "bench: contexts not integers": (["bench", "--contexts", "a,b"], "comma-separated integers", None),
    "bench serve: prompt range upside down": (["bench", "serve", "--prompt-len", "4", "--prompt-len-min", "9"],
                                              "--prompt-len-min (9) must be <= --prompt-len (4)", None),
    # data
    "data: not gzip": (["data", "tokenize", "{bad.jsonl.gz}", "--out", "{root}/tok1", "--quiet", "--workers", "1"],
                       "not a complete gzip file", "{root}/tok1"),
    "data: cut gzip": (["data", "tokenize", "{cut.jsonl.gz}", "--out", "{root}/tok2", "--quiet", "--workers", "1"],
                       "not a complete gzip file", "{root}/tok2"),
    "data: out is a file": (["data", "tokenize", "{prompts.txt}", "--out", "{empty.txt}", "--quiet"], "is a file",
                            None),
    "data: missing input": (["data", "tokenize", "{root}/absent.jsonl", "--out", "{root}/tok3"], "does not exist",
                            "{root}/tok3"),
    "data: nothing to tokenize": (["data", "tokenize", "--out", "{root}/tok4"], "nothing to tokenize", "{root}/tok4"),
    "data: unknown corpus source": (["data", "build-corpus", "--out", "{root}/c", "--sources", "nope"],
                                    "unknown source", "{root}/c"),
    # train
    "train: misspelt model key": ([*TRAIN, "--model-overrides", '{"hidden_sise": 3}'], "did you mean 'hidden_size'",
                                  "{root}/never"),
    "train: overrides a list": ([*TRAIN, "--model-overrides", "[1]"], "must be a JSON object", "{root}/never"),
    "train: one beta": ([*TRAIN, "--betas", "[0.9]"], "two numbers in [0, 1)", "{root}/never"),
    "train: betas above 1": ([*TRAIN, "--betas", "[2, 3]"], "two numbers in [0, 1)", "{root}/never"),
    "train: unknown device": ([*TRAIN, "--device", "tpu"], "unknown device 'tpu'", "{root}/never"),
    "train: rows past the positions": ([*TRAIN, "--block-size", "300"], "exceed the model's 256 positions",
                                       "{root}/never"),
    "train: ids past the vocabulary": ([*TRAIN, "--model-overrides", '{"vocab_size": 100}'],
                                       "train.bin holds token id 499 but the model has 100 embeddings", "{root}/never"),
    "train: damaged meta.json": ([*TRAIN[:3], "--data-dir", "{bad-meta}", *TRAIN[5:]], "meta.json is not valid JSON",
                                 "{root}/never"),
    "train: unknown config": (["train", "--config", "nope"], "no train config nope", None),
    "train: resume another model": ([*RESUME, "--out", "{run}", "--model-overrides",
                                     '{"hidden_size": 128, "v_head_dim": 64}'], "hidden_size 64 -> 128",
                                    "{run}/step-0000003"),
    "train: resume past max_steps": ([*RESUME, "--out", "{run}", "--max-steps", "1"], "at step 2, past max_steps 1",
                                     None),
    "train: resume a cut state": ([*RESUME, "--out", "{run-cut}", "--max-steps", "3"], "trainer_state.pt is damaged",
                                  "{run-cut}/step-0000003"),
    "train: resume cut weights": ([*RESUME, "--out", "{run-cut-weights}", "--max-steps", "3"],
                                  "model.safetensors is not a readable safetensors file",
                                  "{run-cut-weights}/step-0000003"),
    "train: JSON not parsed (argparse)": ([*TRAIN, "--model-overrides", "{bad"], "invalid loads value", None),
    # study
    "study: unknown device": (["study", "--out", "{root}/st", "--device", "tpu"], "unknown device 'tpu'", "{root}/st"),
    "study: no seeds": (["study", "--out", "{root}/st", "--seeds", "0"], "--seeds must be >= 1", "{root}/st"),
    "study: bad --set": (["study", "--out", "{root}/st", "--set", "nonsense"], "KEY=VALUE", "{root}/st"),
    "study: report of no study": (["study", "--out", "{root}", "--report-only"], "not a study directory", None),
    # eval
    "eval: nothing asked": (["eval"], "give --model", None),
    "eval: unknown task": (["eval", "--model", "{ckpt}", "--tasks", "nope"], "nope", None),
    "eval: limit 0": (["eval", "--model", "{ckpt}", "--tasks", "piqa", "--limit", "0"], "--limit must be", None),
    "eval: output a folder": (["eval", "--model", "{ckpt}", "--tasks", "piqa", "--output", "{root}"],
                              "is a directory", None),
    # serve
    "serve: port past 65535": (["serve", "--port", "70000"], "not a TCP port", None),
    "serve: context 0": (["serve", "--max-context", "0"], "--max-context must be positive", None),
    "serve: no slots": (["serve", "--max-batch", "0"], "--max-batch must be positive", None),
    "serve: unknown device": (["serve", "--device", "tpu"], "unknown device 'tpu'", None),
    "serve: truncated weights": (["serve", "--model", "{truncated}"], "not a readable safetensors", None),
    "serve: context past the model": (["serve", "--max-context", "100000"], "max_len must be in", None),
}

if not torch.cuda.is_available():
    ROWS |= {"generate: CUDA without a GPU": (["generate", "hi", "--device", "cuda"], "no CUDA device", None),
             "train: CUDA without a GPU": ([*TRAIN, "--device", "cuda"], "no CUDA device", "{root}/never")}


@pytest.mark.parametrize("argv, message, not_created", ROWS.values(), ids=ROWS.keys())
def test_bad_input_is_one_line_and_exit_2(paths, monkeypatch, capsys, argv, message, not_created):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    # stdin as a terminal or pipe gives it: undecodable bytes become lone surrogates (surrogateescape).
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), errors="surrogateescape"))
    argv = [fill(arg, paths) for arg in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    except Exception as exc:  # noqa: BLE001 - this is what a user would see as a traceback
        pytest.fail(f"hymba {' '.join(argv)} raised {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2, err
    assert "Traceback" not in out + err
    assert len(errors) == 1 and message in errors[0], err
    if not_created:
        assert not Path(fill(not_created, paths)).exists()


def test_a_resumed_run_that_was_refused_is_unchanged(paths):
    """The rows above that refuse a resume must leave the run as it was (its log, its latest pointer)."""
    run = Path(paths["run"])
    assert (run / "latest").read_text().strip() == "step-0000002"
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2]


def hymba_process(*args: str | bytes, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hymba.cli", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def test_non_utf8_chat_input_in_a_real_process():
    chat = hymba_process("chat", "--max-new-tokens", "2", "--device", "cpu")
    out, err = chat.communicate(b"caf\xe9\n", timeout=120)
    assert chat.returncode == 2 and b"Traceback" not in err
    assert err.decode().strip().splitlines()[-1] == ("hymba chat: error: the input is not UTF-8 text (character 3); "
                                                     "give UTF-8 text")


def test_a_reader_that_leaves_ends_generate_quietly():
    """`hymba generate ... | head -c 20`: no BrokenPipeError traceback, the status a SIGPIPE gives (141)."""
    generate = hymba_process("generate", "Once upon a time", "--max-new-tokens", "1000", "--seed", "0",
                             "--device", "cpu")
    assert len(generate.stdout.read(20)) == 20
    generate.stdout.close()
    assert generate.wait(timeout=120) == 141
    assert generate.stderr.read() == b""
