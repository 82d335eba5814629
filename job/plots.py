"""PNG figures for the MLflow run: learning curves and the test-set confusion matrix (rank 0 only)."""

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation."""
    plt = _pyplot()
    epochs = [r["epoch"] + 1 for r in history]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 4))
    loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    acc.plot(epochs, [r["train_acc"] for r in history], label="train")
    if any(r.get("val_acc") is not None for r in history):
        loss.plot(epochs, [r["val_loss"] for r in history], label="validation")
        acc.plot(epochs, [r["val_acc"] for r in history], label="validation")
    loss.set(xlabel="epoch", ylabel="loss", title="loss")
    acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix(confusion: torch.Tensor, classes: tuple[str, ...], path: Path) -> Path:
    """Counts (rows: true class, columns: predicted), with each class's accuracy in its row label."""
    plt = _pyplot()
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} ({a:.1%})" for c, a in zip(classes, per_class.tolist())])
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7)
    total = int(confusion.diag().sum()) / max(1, int(confusion.sum()))
    ax.set(xlabel="predicted", ylabel="true (per-class accuracy)", title=f"test accuracy {total:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
