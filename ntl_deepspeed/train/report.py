"""End-of-run summary table and PNG curves."""
from __future__ import annotations

from typing import Dict, List, Optional

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


EVAL_COLUMNS = ["ce", "ce_non_number", "ce_number", "ntl", "number_accuracy", "number_mae"]


def eval_summary(evals: List[Dict[str, float]], generation: Optional[Dict] = None) -> str:
    """Every evaluation (held-out data) as a markdown table, and the generated answers."""
    lines = []
    if evals:
        lines += ["held-out evaluation:", "| after step | " + " | ".join(EVAL_COLUMNS) + " |",
                  "|---" * (len(EVAL_COLUMNS) + 1) + "|"]
        for r in evals:
            lines.append(f"| {r['step'] + 1} | " + " | ".join(f"{r[k]:.4g}" for k in EVAL_COLUMNS)
                         + " |")
    if generation:
        lines.append(f"generated answers ({generation['n']} {'held-out ' if generation['held_out'] else ''}"
                     f"arithmetic prompts): exact match {generation['exact_match']:.3f}, MAE "
                     f"{generation['mae']:.4g}, with a number {generation['parsed']:.3f}")
    return "\n".join(lines)


def plot_curves(history: List[Dict[str, float]], path: str,
                evals: Optional[List[Dict[str, float]]] = None) -> str:
    """Training curves (loss, NTL, number MAE, number-token accuracy); held-out evaluations
    (e.g. unseen arithmetic problems) as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = evals or []
    steps = [r["step"] + 1 for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, keys, title in ((axes[0], ("ce", "loss"), "loss"), (axes[1], ("ntl",), "NTL"),
                            (axes[2], ("number_mae",), "|y-hat - y| on number labels"),
                            (axes[3], ("number_accuracy",), "number-token accuracy")):
        for k in (k for k in keys if k in history[0]):
            ax.plot(steps, [r[k] for r in history], label=k)
        eval_keys = ("ce", "ce_non_number") if ax is axes[0] else keys
        for k in (k for k in eval_keys if evals and k in evals[0]):
            ax.plot([r["step"] + 1 for r in evals], [r[k] for r in evals], "o--",
                    label=f"eval {k}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
