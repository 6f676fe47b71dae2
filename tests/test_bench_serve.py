"""`hymba bench serve` in its CPU mode: it runs the load through the engine (and over HTTP) and reports every figure
(never timings: tests do not time things)."""

import json

import pytest

from hymba.bench_serve import ServeLoad, arrival_offsets, percentiles, random_prompts
from hymba.cli import main


def test_percentiles_are_nearest_rank():
    assert percentiles([]) == {}
    got = percentiles([float(v) for v in range(1, 101)])
    assert (got["p50"], got["p90"], got["p99"], got["mean"]) == (50.0, 90.0, 99.0, 50.5)


def test_poisson_arrivals_are_seeded_and_increasing():
    load = ServeLoad(requests=50, prompt_len=4, output_len=4, slots=2, arrivals="poisson", seed=3)
    offsets = arrival_offsets(load, rate=10.0)
    assert offsets == arrival_offsets(load, rate=10.0) and offsets[0] == 0.0
    assert all(b > a for a, b in zip(offsets, offsets[1:])) and 2 < offsets[-1] < 10  # about 49 / 10 s
    assert arrival_offsets(ServeLoad(3, 4, 4, 2), None) == [0.0, 0.0, 0.0]


def test_prompt_lengths_vary_within_the_range_when_asked():
    assert {len(p) for p in random_prompts(ServeLoad(20, 6, 4, 2), 100)} == {6}
    lengths = [len(p) for p in random_prompts(ServeLoad(200, 6, 4, 2, prompt_len_min=2), 100)]
    assert min(lengths) == 2 and max(lengths) == 6


def test_serve_bench_with_prompts_of_mixed_lengths(capsys):
    assert main(["bench", "serve", "--requests", "6", "--prompt-len", "8", "--prompt-len-min", "3",
                 "--output-len", "3", "--slots", "3"]) == 0
    assert "6 requests x (3-8 prompt + 3 new)" in capsys.readouterr().out


def test_serve_bench_runs_and_reports(tmp_path, capsys):
    pytest.importorskip("openai")
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--requests", "4", "--prompt-len", "8", "--output-len", "4", "--slots", "2",
                 "--arrivals", "poisson", "--rate", "50", "--http", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| engine, poisson 50.0 req/s |" in printed and "| engine over HTTP |" in printed
    assert "static decode step at the Poisson run's batch" in printed and "| ITL p50 / p90 (ms) |" in printed
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["engine, poisson 50.0 req/s", "engine over HTTP"]
    for result in report["results"]:
        assert result["requests"] == 4 and result["output_tok_s"] > 0
        assert set(result["ttft_s"]) == {"p50", "p90", "p99", "mean"}
        assert set(result["tpot_ms"]) == set(result["itl_ms"]) == {"p50", "p90", "mean"}
    assert report["static"]["output_tok_s"] > 0 and report["static_step_ms"] is not None


def test_serve_bench_bad_input_is_one_line(capsys):
    assert main(["bench", "serve", "--requests", "0"]) == 2
    assert "--requests must be >= 1" in capsys.readouterr().err
