"""The study's figures, from the summary that `hymba.study.run.summarize` builds. matplotlib is optional:
without it `make_plots` returns no files and the tables are written alone.

- val_loss.png: validation loss against training step, mean over seeds with the spread as a band;
- recall_vs_length.png: MQAR and phonebook accuracy against context length (MQAR's pairs grow with it), the sliding
  window marked;
- recall_vs_cache.png: accuracy at the longest length against the cache bytes a sequence of that length needs;
- attention_sink.png: per layer, the attention share on the first token and on the meta tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _style(name: str) -> dict[str, Any]:
    # Hymba's family in solid lines, the baselines dashed, so the ablations read as one group.
    return {"label": name, "linestyle": "-" if name.startswith("hymba") else "--", "marker": "o", "markersize": 3}


def plot_val_loss(plt, summary: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in summary.items():
        curve = s["val_loss_curve"]
        steps = [c["step"] for c in curve]
        mean = [c["mean"] for c in curve]
        (line,) = ax.plot(steps, mean, **_style(name))
        ax.fill_between(steps, [c["mean"] - c["spread"] for c in curve], [c["mean"] + c["spread"] for c in curve],
                        color=line.get_color(), alpha=0.15)
    ax.set(xlabel="training step", ylabel="validation loss (nats/token)", title="Language modelling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_recall_vs_length(plt, summary: dict[str, Any], lengths: tuple[int, ...], pairs: list[int], window: int,
                          path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    ticks = {"mqar": [f"{n}\n{p} pairs" for n, p in zip(lengths, pairs)], "phonebook": [str(n) for n in lengths]}
    for ax, task, title in zip(axes, ("mqar", "phonebook"), ("MQAR (value accuracy)", "Phonebook (exact match)")):
        for name, s in summary.items():
            stats = [s["metrics"][f"{task}@{n}"] for n in lengths]
            ax.errorbar(lengths, [st["mean"] for st in stats], yerr=[st["spread"] for st in stats], capsize=2,
                        **_style(name))
        ax.axvline(window, color="grey", linewidth=0.8, linestyle=":")
        ax.text(window, 0.02, " window", color="grey", fontsize=8, transform=ax.get_xaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, ticks[task], minor=False)
        ax.set_xticks([], minor=True)
        ax.set(xlabel="context length (tokens)", title=title, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_recall_vs_cache(plt, summary: dict[str, Any], length: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, s) in enumerate(summary.items()):
        x = s["recall_cache_bytes"][str(length)] / 1024
        for task, marker in (("mqar", "o"), ("phonebook", "s")):
            stat = s["metrics"][f"{task}@{length}"]
            ax.errorbar([x], [stat["mean"]], yerr=[stat["spread"]], marker=marker, capsize=2, color=f"C{index}",
                        label=name if task == "mqar" else None)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
    # Minor ticks labelled at 2, 3 and 5 x 10^k only: every one of them crowds the axis.
    ax.xaxis.set_minor_formatter(plt.FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:e}"[0] in "235" else ""))
    ax.set(xlabel=f"cache per sequence at {length} tokens (KiB)", ylabel="accuracy",
           title=f"Recall at {length} tokens against cache size (circles MQAR, squares phonebook)",
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_attention_sink(plt, summary: dict[str, Any], path: Path) -> bool:
    with_attention = {name: s["attention_sink"] for name, s in summary.items() if s["attention_sink"]}
    if not with_attention:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("first_token", "meta"), ("on the first token", "on the meta tokens")):
        for name, layers in with_attention.items():
            ax.plot([s["layer"] for s in layers], [s[key] for s in layers], **_style(name))
        ax.set(xlabel="layer", title=f"Attention share {title}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean share of a text query's attention")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def make_plots(summary: dict[str, Any], preset, out: Path) -> list[Path]:
    """Write every figure into `out`; returns their paths (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out)
    paths = [out / "val_loss.png", out / "recall_vs_length.png", out / "recall_vs_cache.png"]
    plot_val_loss(plt, summary, paths[0])
    from hymba.study.tasks import mqar_pairs

    pairs = [mqar_pairs(n, preset.mqar_pairs_ratio) for n in preset.recall_lengths]
    plot_recall_vs_length(plt, summary, preset.recall_lengths, pairs, preset.shape.sliding_window, paths[1])
    plot_recall_vs_cache(plt, summary, preset.recall_lengths[-1], paths[2])
    if plot_attention_sink(plt, summary, out / "attention_sink.png"):
        paths.append(out / "attention_sink.png")
    return paths
