"""One recall training run of a study variant with preset overrides: how the recall arm's settings were chosen.

    python benchmarks/recall_sweep.py --variant llama --set recall_lengths=[64] --set recall_mqar_only_steps=3000
    python benchmarks/recall_sweep.py --set recall_embedding_std=0.3 --set recall_tie_embeddings=true

Trains `train_recall` exactly as `hymba study` does (its optimizer, schedule, early stopping and skipped non-finite
steps) on the preset's recall settings with the overrides, then prints one JSON line: the settings, seconds, steps
trained, `eval_mqar` at every length and the held-out curve. These models leave the GPU mostly idle (host-bound),
so several runs side by side on one GPU (one process each, `&`) fill it; processes time-slice the GPU, so past about
8 runs each one slows down (H200, session 20).
"""

import argparse
import json
import time

import torch

from hymba.study.run import PRESETS, _parse_override, recall_config, train_recall
from hymba.study.tasks import RecallVocab, eval_mqar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--variant", default="llama")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preset override")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = dict(_parse_override(text) for text in args.set)
    preset = PRESETS[args.preset].with_overrides(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model, records = train_recall(recall_config(args.variant, preset), preset, args.seed, device)
    seconds = time.perf_counter() - start
    vocab = RecallVocab(preset.recall_vocab_size)
    mqar = {n: eval_mqar(model, vocab, n, preset.recall_eval_examples, preset.recall_eval_batch, 12345,
                         preset.mqar_pairs_ratio, preset.mqar_alpha) for n in preset.recall_lengths}
    print(json.dumps({"variant": args.variant, "overrides": overrides, "seconds": round(seconds, 1),
                      "steps": records[-1]["step"], "mqar": mqar, "curve": records}))


if __name__ == "__main__":
    main()
