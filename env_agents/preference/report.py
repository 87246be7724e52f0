"""vlm_query_log.csv and the accuracy-vs-difficulty plot (RL-VLM-F's figure 6)."""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from env_agents.preference.labelling import COLUMNS, label_correct

OUTCOMES = ("correct", "incorrect", "no_preference")


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def accuracy_by_difficulty(rows: Sequence[Dict[str, Any]], bins: int = 5) -> Dict[str, Any]:
    """Bin pairs by score gap |s1 - s2| (equal-width bins); count outcomes in each. Pairs
    whose request failed (ok = 0) carry no label and are left out."""
    rows = [r for r in rows if int(r.get("ok", 1)) == 1]
    gaps = np.array([abs(float(r["ground_truth_score_1"]) - float(r["ground_truth_score_2"])) for r in rows])
    outcomes = [
        label_correct(
            float(r["ground_truth_score_1"]), float(r["ground_truth_score_2"]), int(r["vlm_predicted_label"])
        )
        for r in rows
    ]
    if not rows:
        return {"edges": [], "counts": {o: [] for o in OUTCOMES}, "accuracy": 0.0, "n": 0}
    edges = np.linspace(0.0, float(gaps.max()) if gaps.max() > 0 else 1.0, bins + 1)
    idx = np.clip(np.digitize(gaps, edges[1:-1]), 0, bins - 1)
    counts = {o: [0] * bins for o in OUTCOMES}
    for b, o in zip(idx, outcomes):
        counts[o][int(b)] += 1
    n = len(rows)
    return {
        "edges": edges.tolist(),
        "counts": counts,
        "accuracy": counts_total(counts, "correct") / n,
        "n": n,
    }


def counts_total(counts: Dict[str, List[int]], outcome: str) -> int:
    return int(sum(counts[outcome]))


def plot_accuracy(
    rows: Sequence[Dict[str, Any]], png_path: str, title: str = "VLM accuracy", bins: int = 5
) -> Dict[str, Any]:
    """Stacked bars per difficulty bin (fraction correct / incorrect / no preference, pair
    counts on top); returns the numbers plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = accuracy_by_difficulty(rows, bins)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if data["n"]:
        edges = np.asarray(data["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        width = (edges[1] - edges[0]) * 0.9
        totals = np.maximum(1, sum(np.asarray(data["counts"][o]) for o in OUTCOMES))
        bottom = np.zeros(len(centers))
        colors = {"correct": "#2e7d32", "incorrect": "#c62828", "no_preference": "#9e9e9e"}
        for o in OUTCOMES:
            frac = np.asarray(data["counts"][o]) / totals
            ax.bar(centers, frac, width, bottom=bottom, color=colors[o], label=o.replace("_", " "))
            bottom += frac
        for x, n in zip(centers, sum(np.asarray(data["counts"][o]) for o in OUTCOMES)):
            ax.text(x, 1.01, str(int(n)), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("difficulty: ground-truth score gap |s1 - s2| (larger = easier)")
    ax.set_ylabel("fraction of pairs")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"{title} (n={data['n']}, accuracy {data['accuracy']:.2f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return data
