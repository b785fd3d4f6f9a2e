"""The run's figures: learning curves with the kept epoch starred, the confusion matrix, and
for multi-label runs a precision-recall curve per label.
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


def plot_pr_curves(truth, probs, classes: list[str], thresholds, path: Path) -> None:
    """One small precision-recall curve per label (validation), its AP in the title and the
    point its threshold gives marked: where the decisions sit on the curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve

    n = len(classes)
    cols = min(6, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.1 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= n:
            ax.axis("off")
            continue
        t = np.asarray(truth[:, j], bool)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=7)
        if not t.any():
            ax.set_title(f"{classes[j]}: no positive", fontsize=8)
            continue
        precision, recall, _ = precision_recall_curve(t, probs[:, j])
        ax.plot(recall, precision, color="#4a7ab5")
        given = probs[:, j] >= thresholds[j]
        if given.any():
            ax.plot([(given & t).sum() / t.sum()], [(given & t).sum() / given.sum()], "o",
                    color="crimson", markersize=5)
        ax.set_title(f"{classes[j]} (AP {average_precision_score(t, probs[:, j]):.3f})",
                     fontsize=8)
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
