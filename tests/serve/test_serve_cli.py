"""`hymba serve` end to end: a subprocess on 127.0.0.1 answers the openai client and stops cleanly on Ctrl-C."""

import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from hymba.config import HymbaConfig  # noqa: E402
from hymba.generate import complete  # noqa: E402
from hymba.model import HymbaForCausalLM  # noqa: E402
from hymba.tokenizer import HymbaTokenizer, default_tokenizer_dir  # noqa: E402


def hymba(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hymba.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_serve_answers_and_stops_on_interrupt(tmp_path):
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny")).eval()
    model.init_weights()
    model.save_pretrained(tmp_path, copy_side_files_from=default_tokenizer_dir())
    with socket.socket() as sock:  # a port free a moment ago; the server binds it right after
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = hymba("serve", "--model", str(tmp_path), "--served-model-name", "tiny", "--port", str(port),
                   "--device", "cpu", "--max-batch", "4", "--log-level", "warning")
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert server.poll() is None, server.communicate()[1]
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
        assert out.choices[0].text == complete(model, HymbaTokenizer.from_pretrained(tmp_path),
                                               ["Once upon a time"], max_new_tokens=6)[0]
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert f"on http://127.0.0.1:{port}/v1" in stderr


def test_bad_arguments_are_one_line():
    result = hymba("serve", "--max-batch", "0")
    _, stderr = result.communicate(timeout=60)
    assert result.returncode == 2 and stderr.strip() == "hymba serve: error: --max-batch must be positive, got 0"
