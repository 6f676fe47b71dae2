"""`hymba bench`: the CPU mode end to end (JSON rows, cache accounting), the bytes a decode step must move,
the synthetic cache fill against a real prefill, and batch halving on out-of-memory. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from hymba.bench import (
    MODELS,
    Row,
    decode_bytes_breakdown,
    decode_bytes_per_step,
    fill_cache_synthetic,
    format_plain_table,
    run_halving,
    transformers_available,
)
from hymba.cache import HymbaCache
from hymba.cli import main
from hymba.config import HymbaConfig
from hymba.generate import decode_step, prefill
from hymba.model import HymbaForCausalLM

CPU = torch.device("cpu")


def test_bench_cpu_writes_json_rows(tmp_path, capsys):
    out = tmp_path / "out.json"
    contexts, batches = [16, 32], [1, 2]
    code = main(["bench", "--device", "cpu", "--contexts", "16,32", "--batches", "1,2", "--steps", "2",
                 "--warmup-steps", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    models = ["tiny", "tiny-llama"] + (["transformers-tiny-llama"] if transformers_available() else [])
    assert [(r["model"], r["context"], r["batch"]) for r in report["rows"]] == [
        (m, c, b) for m in models for c in contexts for b in batches]
    assert report["device_type"] == "cpu" and report["torch_version"] == torch.__version__
    assert report["dtype"] == "float32" and report["bandwidth_gb_s"] > 0
    for row in report["rows"]:
        assert row["prefill_batch"] == row["decode_batch"] == row["batch"]  # nothing runs out of memory here
        for key in ("prefill_tok_s", "prefill_s", "decode_tok_s", "ms_per_step", "decode_bytes_per_step",
                    "min_ms_per_step", "bandwidth_fraction"):
            assert row[key] > 0, key
        assert row["decode_tok_s"] == pytest.approx(row["batch"] / row["ms_per_step"] * 1e3)
        assert row["cache_bytes_per_seq_alloc"] == row["cache_bytes_per_seq_analytic"] > 0
        assert row["decode_bytes_per_step"] == sum(row["decode_bytes"].values())
        assert row["decode_context"] == row["context"] - 1  # 2 timed steps: cached tokens c-2, c-1 (mean c-1.5)
        assert row["prefill_peak_gib"] is None and row["cuda_graph"] is False
    ratios = report["ratios"]
    assert {(r["hymba"], r["baseline"], r["context"]) for r in ratios} == {
        ("tiny", m, c) for m in models[1:] for c in contexts}
    for r in ratios:
        assert r["decode_speedup"] > 0 and r["prefill_speedup"] > 0 and r["cache_ratio"] > 0
        assert r["decode_hymba_batch"] == r["decode_baseline_batch"] == 2  # the largest batch that ran
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and "tiny vs tiny-llama" in printed


def test_decode_bytes_hymba_1_5b_match_gpu_notes():
    """GPU-NOTES: weights 3.05 GB, KV 6.1 + 4.0 + 4.2 GB, SSM 1.7 GB, conv 0.16 GB: about 19 GB (8K, batch 128)."""
    config = HymbaConfig.preset("hymba-1.5b")
    parts = decode_bytes_breakdown(config, 8192, 128, torch.bfloat16, torch.float32)
    expected = dict(weights=3.05e9, kv_global=6.1e9, kv_window=4.0e9, kv_reuse=4.2e9, ssm_state=1.7e9,
                    conv_state=0.16e9)
    for key, value in expected.items():
        assert parts[key] == pytest.approx(value, rel=0.03), key
    total = decode_bytes_per_step(config, 8192, 128)  # bf16 K/V and weights, float32 SSM state by default
    assert total == sum(parts.values()) == pytest.approx(19.2e9, rel=0.03)
    # At batch 1 the weights dominate (~1 ms at 3 TB/s).
    assert decode_bytes_per_step(config, 8192, 1) == pytest.approx(3.05e9 + 19.2e9 / 128 - 3.05e9 / 128, rel=0.03)


def test_decode_bytes_llama_shape_has_no_ssm_and_reads_all_keys():
    config = MODELS["llama-3.2-3b"].config()
    parts = decode_bytes_breakdown(config, 8192, 1)
    assert parts["ssm_state"] == parts["conv_state"] == parts["kv_window"] == parts["kv_reuse"] == 0
    # 28 layers x 8 KV heads x (128 + 128) x 2 bytes per token: the paper's ~918 MB at 8K, plus one token.
    assert parts["kv_global"] == 28 * 8 * 256 * 2 * 8193
    assert parts["kv_global"] == pytest.approx(config.cache_bytes(8192), rel=1e-3)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_synthetic_fill_lays_out_the_cache_as_prefill_does(name):
    config = MODELS[name].config()
    model = HymbaForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    batch, max_len, length = 2, 20, 13  # 13 > window + 1: the ring has wrapped
    real = HymbaCache(config, batch, max_len)
    synthetic = HymbaCache(config, batch, max_len)
    with torch.inference_mode():
        prefill(model, real, torch.randint(0, config.vocab_size, (batch, length)), None)
        fill_cache_synthetic(synthetic, length)
        for window, layout in real.layouts.items():
            assert torch.equal(layout.valid, synthetic.layouts[window].valid)
            assert torch.equal(layout.positions, synthetic.layouts[window].positions)
        assert torch.equal(real.next_position, synthetic.next_position) and synthetic.started
        logits = decode_step(model, synthetic, torch.tensor([3, 5]))
    assert logits.shape == (batch, config.vocab_size) and torch.isfinite(logits).all()
    assert int(synthetic.next_position[0]) == config.num_memory_tokens + length + 1


def test_run_halving_halves_on_oom_only():
    tried = []

    def fn(batch):
        tried.append(batch)
        if batch > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * 10

    notes = []
    assert run_halving(fn, 16, CPU, notes.append, "case") == (2, 20)
    assert tried == [16, 8, 4, 2] and len(notes) == 3

    def never(batch):
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")

    assert run_halving(never, 4, CPU) == (None, None)

    def broken(batch):
        raise ValueError("a real bug")

    with pytest.raises(ValueError):
        run_halving(broken, 4, CPU)


def test_plain_table_and_bad_arguments(capsys):
    row = Row(model="tiny", engine="hymba", context=64, batch=128, prefill_batch=64, decode_batch=128,
              prefill_tok_s=1234.5, decode_tok_s=99.0, ms_per_step=1.5, bandwidth_fraction=0.5,
              cache_bytes_per_seq_alloc=2_000_000, cache_bytes_per_seq_analytic=2_000_000, decode_peak_gib=3.0)
    lines = format_plain_table([row]).splitlines()
    assert lines[0].split()[:3] == ["model", "context", "batch"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "128→64/128" in lines[2] and "1,234" in lines[2] and "50.0" in lines[2] and "2.00 / 2.00" in lines[2]

    assert main(["bench", "--device", "cpu", "--contexts", "8", "--steps", "8"]) == 2
    assert main(["bench", "--device", "cpu", "--models", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "leaves no prompt" in err and "unknown model" in err


def test_bench_decode_only_from_a_real_prefill(tmp_path):
    out = tmp_path / "out.json"
    assert main(["bench", "--device", "cpu", "--models", "tiny", "--contexts", "16", "--batches", "2", "--steps", "2",
                 "--warmup-steps", "1", "--fill", "prefill", "--no-prefill", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert report["fill"] == "prefill" and row["prefill_tok_s"] is None and row["decode_tok_s"] > 0
    assert row["cache_bytes_per_seq_alloc"] == row["cache_bytes_per_seq_analytic"]


def test_json_is_rewritten_after_every_case(tmp_path, monkeypatch):
    """A run stopped part-way (a timeout, Ctrl-C) keeps the rows it finished in --json."""
    import hymba.bench as bench

    out, seen = tmp_path / "out.json", []
    real = bench.write_json_atomic

    def spy(path, data):
        seen.append(len(data["rows"]))
        real(path, data)

    monkeypatch.setattr(bench, "write_json_atomic", spy)
    assert main(["bench", "--device", "cpu", "--models", "tiny", "--contexts", "16", "--batches", "1,2", "--steps",
                 "2", "--warmup-steps", "1", "--no-prefill", "--json", str(out)]) == 0
    assert seen == [1, 2, 2]  # after each case, then the final report
