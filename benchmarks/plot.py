"""``results/core.png``: throughput (a), handoff latency percentiles (b), waiting cost (c)."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.harness import ScenarioResult, median
from benchmarks.libs import LABELS

#: Scenario (t)'s figure, written beside ``core.png``.
SEMAPHORE_PNG = "semaphore.png"


def plot(results: list[ScenarioResult], path: Path) -> bool:
    """Draw what the results have; False (and no file) when there is nothing to draw.
    Scenario (t) gets a figure of its own beside ``path``: :data:`SEMAPHORE_PNG`."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {r.key: r for r in results if r.raw}
    if "t" in by_key:
        plot_semaphores(by_key["t"], path.with_name(SEMAPHORE_PNG))
    panels = [k for k in ("a", "b", "c") if k in by_key]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        raw = by_key[key].raw
        if key == "a":
            libs = [lib for lib, v in raw["rate"].items() if v]
            values = [median(raw["rate"][lib]) for lib in libs]
            colors = ["#d62728" if lib == "ours" else "#7f7f7f" if lib == "raw" else "#1f77b4"
                      for lib in libs]
            ax.barh([LABELS[lib] for lib in libs], values, color=colors)
            ax.invert_yaxis()
            ax.set_xlabel("acquire+release cycles/s (median)")
            ax.set_title("(a) uncontended, one process")
        elif key == "b":
            pct = raw["pooled_percentiles_ms"]
            libs = list(pct)
            qs = ["50", "90", "99", "99.9"]
            width = 0.8 / len(qs)
            for j, q in enumerate(qs):
                ys = [pct[lib][q] for lib in libs]
                xs = [i + (j - (len(qs) - 1) / 2) * width for i in range(len(libs))]
                ax.bar(xs, [y if y and not math.isnan(y) else 0 for y in ys], width,
                       label=f"p{q}")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_xticks(range(len(libs)))
            ax.set_xticklabels([LABELS[lib].replace(" ", "\n", 1) for lib in libs], fontsize=8)
            ax.set_ylabel("handoff latency, ms (log)")
            ax.axhline(0.5, color="#d62728", linestyle=":", linewidth=1, label="goal p50 0.5 ms")
            ax.axhline(2.0, color="#d62728", linestyle="--", linewidth=1, label="goal p99 2 ms")
            ax.legend(fontsize=8)
            ax.set_title("(b) 8 processes, one key: release → other's acquire\n"
                         "(all repetitions pooled)", fontsize=10)
        else:
            runs = raw["runs"]
            libs = [lib for lib in runs if runs[lib]]
            cps = [median([r["cmds_per_s"] for r in runs[lib]]) for lib in libs]
            bars = ax.bar(range(len(libs)), cps,
                          color=["#d62728" if lib == "ours" else "#1f77b4" for lib in libs])
            for bar, lib in zip(bars, libs, strict=True):
                wake = median([r["wake_ms"] for r in runs[lib]])
                ax.annotate(f"wake {wake:.2f} ms", (bar.get_x() + bar.get_width() / 2,
                                                   bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(libs)))
            ax.set_xticklabels([LABELS[lib].replace(" ", "\n", 1) for lib in libs], fontsize=8)
            ax.set_ylabel("server commands/s from 4 blocked waiters")
            ax.set_title("(c) cost of waiting, and first wake after release")
    fig.suptitle("celery-singleton-lock vs peers (medians; local redis-server)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_semaphores(res: ScenarioResult, path: Path) -> None:
    """Scenario (t), per backend: limit=4 over the lock uncontended, 16 processes' limit=4
    throughput over limit=1, and limit=4's handoff p50/p99, each against its goal."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.scenario_semaphore_backends import (
        GOAL_P99_MS,
        GOAL_SPEEDUP,
        GOAL_UNCONTENDED,
        LIMIT,
    )

    bars = [(name, lib) for name, result in res.raw.items() if name != "failed"
            for lib in result["libs"]]
    labels = [name if lib == "ours" else f"{name}\n{LABELS[lib].split(' (')[0]}" for name, lib in bars]
    colors = ["#d62728" if lib == "ours" else "#7f7f7f" for _, lib in bars]

    def values(field: str, part: str, pick: str) -> list[float]:
        out = []
        for name, lib in bars:
            entry = res.raw[name][part][f"{lib}:{LIMIT}"]
            out.append(median(entry[field]) if pick == "self" else
                       median([r[pick] for r in entry["runs"]]))
        return out

    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    panels = [
        (axes[0], values("x_lock", "uncontended", "self"), GOAL_UNCONTENDED,
         f"limit={LIMIT} cycles/s over limit=1 (one process, uncontended)"),
        (axes[1], values("x_limit1", "contended", "self"), GOAL_SPEEDUP,
         f"16 processes: limit={LIMIT} acq/s over limit=1 (same hold)"),
    ]
    for ax, ys, goal, title in panels:
        ax.barh(range(len(bars)), ys, color=colors)
        ax.axvline(goal, color="#d62728", linestyle="--", linewidth=1, label=f"goal ≥ {goal}")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    p50, p99 = values("", "contended", "p50"), values("", "contended", "p99")
    height = 0.4
    axes[2].barh([i - height / 2 for i in range(len(bars))], p50, height, label="p50", color="#1f77b4")
    axes[2].barh([i + height / 2 for i in range(len(bars))], p99, height, label="p99", color="#ff7f0e")
    axes[2].axvline(GOAL_P99_MS, color="#d62728", linestyle="--", linewidth=1,
                    label=f"goal p99 ≤ {GOAL_P99_MS:.0f} ms (Redis)")
    axes[2].set_xscale("log")
    axes[2].xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[2].set_title(f"16 processes: limit={LIMIT} handoff, ms (log)", fontsize=10)
    axes[2].legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels(labels if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
    fig.suptitle("(t) semaphores on every backend: celery-singleton-lock (red), "
                 "kazoo's Semaphore (grey); medians over repetitions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
