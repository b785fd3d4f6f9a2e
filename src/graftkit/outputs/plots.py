"""The run's figures: learning curves with the kept epoch starred, and the confusion matrix.
"""

from __future__ import annotations

from pathlib import Path

from graftkit.files import atomic_write


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))



def score_key(row: dict) -> str:
    """The score a history row holds: accuracy, or mAP ("map") in multi-label runs."""
    return "map" if "val_map" in row else "accuracy"


def best_row(rows: list[dict], phases=("head", "fine_tune")) -> int | None:
    """Index of the epoch whose weights a run keeps: best val accuracy, ties lower val loss."""
    best = None
    for i, r in enumerate(rows):
        if r["phase"] not in phases:
            continue
        key = (float(r[f"val_{score_key(r)}"]), -float(r["val_loss"]))
        if best is None or key > best[0]:
            best = (key, i)
    return None if best is None else best[1]



def plot_history(rows: list[dict], path: Path, best: int | None = None) -> None:
    """Loss and accuracy per epoch across both phases; the phase boundary and the kept epoch
    (``best``, an index into ``rows``) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = list(range(1, len(rows) + 1))
    for ax, key in zip(axes, ("loss", score_key(rows[0]) if rows else "accuracy")):
        ax.plot(steps, [r[key] for r in rows], "o-", label=f"train {key}")
        ax.plot(steps, [r[f"val_{key}"] for r in rows], "o-", label=f"val {key}")
        n_head = sum(r["phase"] == "head" for r in rows)
        if 0 < n_head < len(rows):
            ax.axvline(n_head + 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        if best is not None:
            ax.plot([best + 1], [rows[best][f"val_{key}"]], "*", color="crimson", markersize=14,
                    label=f"kept: epoch {rows[best]['epoch']} ({rows[best]['phase']})")
        ax.set_xlabel("epoch (both phases)")
        ax.set_title(key)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)



def plot_confusion(matrix, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > top / 2 else "black", fontsize=8)
    ax.set_title("validation confusion matrix")
    save_figure(fig, path)
    plt.close(fig)
