"""Audit reports: a table, `audit.json` and `audit.png` (ROC curves of the
canary scores, and the reported epsilon next to the measured lower bound)."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from . import statistics


def table(runs: list[dict]) -> str:
    """One line per audited run."""
    lines = [
        "| data | model | epsilon reported | epsilon lower bound (95%) | correct / "
        "guesses | canary AUC | TPR at FPR 0.1 | MI lower bound | test accuracy "
        "| holds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r, c = run["result"], run["config"]
        reported = r["epsilon_reported"]
        reported = reported if isinstance(reported, str) else f"{reported:.3f}"
        lines.append(
            f"| {os.path.basename(str(c['data']))} | {c['model']} | {reported} | "
            f"{r['epsilon_lower_bound']:.3f} | {r['num_correct']} / "
            f"{r['num_guesses']} | {r['canary_auc']:.3f} | "
            f"{r['tpr_at_fpr_01']:.3f} | {r['membership_epsilon_lower_bound']:.3f} | "
            f"{run['test_accuracy']:.3f} | {'yes' if run['holds'] else 'NO'} |"
        )
    return "\n".join(lines)


def _label(run: dict) -> str:
    epsilon = run["config"]["epsilon"]
    noise = "no noise" if epsilon is None else f"eps {epsilon:g}"
    return f"{run['config']['model']}, {noise}"


def write_report(runs: list[dict], output_dir: str) -> tuple[str, str]:
    """Write `audit.json` (every run, scores included) and `audit.png`.

    Returns:
        The paths (json, png).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "audit.json")
    with open(json_path, "w") as f:
        json.dump({"runs": runs}, f, indent=2)
    figure, (roc, bars) = plt.subplots(1, 2, figsize=(11, 4.5))
    for run in runs:
        scores = np.asarray(run["scores"])
        included = np.asarray(run["included"], dtype=bool)
        if included.all() or not included.any():
            continue
        fpr, tpr, _ = statistics.roc_curve(scores[included], scores[~included])
        roc.plot(fpr, tpr, label=_label(run))
    roc.plot([0, 1], [0, 1], "k:", linewidth=1)
    roc.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="Canary scores: included vs excluded",
    )
    roc.legend(fontsize=8)
    labels = [_label(run) for run in runs]
    position = np.arange(len(runs))
    reported = [
        np.nan if isinstance(r, str) else r
        for r in (run["result"]["epsilon_reported"] for run in runs)
    ]
    bound = [run["result"]["epsilon_lower_bound"] for run in runs]
    bars.bar(position - 0.2, reported, 0.4, label="reported (accounting)")
    bars.bar(position + 0.2, bound, 0.4, label="lower bound (audit, 95%)")
    bars.set_xticks(position, labels, rotation=20, fontsize=8)
    bars.set(ylabel="epsilon", title="Reported epsilon vs measured lower bound")
    bars.legend(fontsize=8)
    figure.tight_layout()
    png_path = os.path.join(output_dir, "audit.png")
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return json_path, png_path


def summary(runs: list[dict]) -> dict:
    """The worst case over the DP runs: the largest lower bound / reported
    ratio (must stay <= 1) and the strongest no-noise lower bound."""
    dp = [r for r in runs if r["config"]["epsilon"] is not None]
    reference = [r for r in runs if r["config"]["epsilon"] is None]
    ratios = [
        r["result"]["epsilon_lower_bound"] / r["result"]["epsilon_reported"] for r in dp
    ]
    return {
        "all_hold": all(r["holds"] for r in runs),
        "max_ratio_lower_bound_to_reported": max(ratios) if ratios else math.nan,
        "no_noise_lower_bound": max(
            (r["result"]["epsilon_lower_bound"] for r in reference), default=math.nan
        ),
    }


__all__ = ["summary", "table", "write_report"]
