"""Benchmark evaluation: task loaders (`tasks`), per-document metrics (`scorers`), the batched runner (`harness`),
the `hymba eval` command (`cli`) and an lm-evaluation-harness model (`lm_eval_adapter`, needs lm-eval)."""
