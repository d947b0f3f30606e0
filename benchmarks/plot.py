"""``results/core.png``: throughput (a), handoff latency percentiles (b), waiting cost (c)."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.harness import ScenarioResult, median
from benchmarks.libs import LABELS


def plot(results: list[ScenarioResult], path: Path) -> bool:
    """Draw what the results have; False (and no file) when there is nothing to draw."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {r.key: r for r in results if r.raw}
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
