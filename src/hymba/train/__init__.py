"""Training: data preparation (offline corpus, tokenized token files, batch samplers) and the trainer."""
