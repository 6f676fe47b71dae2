"""Hymba-1.5B vs Llama-3.2-3B shape: prefill/decode throughput, cache size, bandwidth use (random weights).

A thin wrapper over `hymba bench` (see `hymba.bench`); every option of that command works here, e.g.

    python benchmarks/bench_decode.py --json results/bench-h100.json
    python benchmarks/bench_decode.py --contexts 8192 --batches 128 --models hymba-1.5b,transformers-llama
    python benchmarks/bench_decode.py --device cpu            # toy shapes, for a quick check without a GPU
"""

from __future__ import annotations

import sys

from hymba.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
