"""End-of-run summary table and PNG curves."""
from __future__ import annotations

from typing import Dict, List

COLUMNS = ["loss", "ce", "ntl", "number_accuracy", "number_mae", "tokens_per_s"]


def summary_table(history: List[Dict[str, float]]) -> str:
    """First step, last step and the mean of the last 10 % of steps, as a markdown table."""
    if not history:
        return "(no steps run)"
    columns = [k for k in COLUMNS if k in history[0]]
    tail = history[-max(1, len(history) // 10):]
    rows = [("first step", history[0]), ("last step", history[-1]),
            (f"mean of last {len(tail)}", {k: sum(r[k] for r in tail) / len(tail)
                                           for k in columns})]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4g}" for k in columns) + " |")
    return "\n".join(lines)


def plot_curves(history: List[Dict[str, float]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] + 1 for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in ((axes[0], ("ce", "loss"), "loss"), (axes[1], ("ntl",), "NTL"),
                            (axes[2], ("number_mae",), "|y-hat - y| on number labels")):
        for k in (k for k in keys if k in history[0]):
            ax.plot(steps, [r[k] for r in history], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
