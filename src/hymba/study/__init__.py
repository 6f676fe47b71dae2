"""`hymba study`: the paper's controlled architecture comparison (attention, Mamba, sequential and parallel hybrids,
Hymba's ablations) at equal size on the same tokens, with recall tasks, cache and throughput, and attention sinks.

`variants` builds the configs, `tasks` the data and scorers, `run` trains, evaluates and reports, `plots` draws,
`attention_sink` measures where attention mass goes.
"""
