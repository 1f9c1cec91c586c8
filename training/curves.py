"""The run's ``curves.png``: loss, accuracy, solver iterations, α and learning rate per epoch."""

from __future__ import annotations

import io


def curves_png(history: list[dict], title: str) -> bytes:
    """A 2 × 2 figure of the ``metrics.jsonl`` rows in ``history``, as PNG bytes.

    Panels: train/test cross-entropy; train/test accuracy (%); mean forward/backward
    iterations per sample (train) and forward (test); forward and backward α (log scale) with
    the learning rate on a second axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    ax[0, 0].plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    ax[0, 0].plot(ep, [r["test_loss"] for r in history], "s--", label="test")
    ax[0, 0].set(title="cross-entropy loss", xlabel="epoch")
    ax[0, 1].plot(ep, [100 * r["train_accuracy"] for r in history], "o-", label="train")
    ax[0, 1].plot(ep, [100 * r["test_accuracy"] for r in history], "s--", label="test")
    ax[0, 1].set(title="accuracy (%)", xlabel="epoch")
    ax[1, 0].plot(ep, [r["train_fwd_iterations"] for r in history], "o-", label="forward (train)")
    ax[1, 0].plot(ep, [r["train_bwd_iterations"] for r in history], "^-", label="backward (train)")
    ax[1, 0].plot(ep, [r["test_iterations_mean"] for r in history], "s--", label="forward (test)")
    ax[1, 0].set(title="solver iterations per sample (mean)", xlabel="epoch")
    ax[1, 1].plot(ep, [r["alpha"] for r in history], "o-", color="C3", label="α forward")
    backward = [r.get("backward_alpha") or r["alpha"] for r in history]
    ax[1, 1].plot(ep, backward, "^-", color="C1", label="α backward")
    ax[1, 1].set(title="PR step sizes α (tuned)", xlabel="epoch", yscale="log")
    lr_ax = ax[1, 1].twinx()
    lr_ax.plot(ep, [r["lr"] for r in history], ":", color="C7", label="learning rate")
    lr_ax.set(yscale="log", ylabel="learning rate")
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}: training curves")
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=90, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


__all__ = ["curves_png"]
