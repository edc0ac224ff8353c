"""The loss curve of a run, drawn to a PNG."""

from __future__ import annotations

import os


def write_loss_curve(losses: list[tuple[int, float]], path: str | os.PathLike,
                     eval_losses: list[tuple[int, float]] | None = None) -> None:
    """Plot (step, loss) pairs to `path`; `eval_losses`, the held-out loss at the steps it was measured, beside."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib import pyplot as plt

    steps, values = zip(*losses)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot(steps, values, color="tab:blue", label="training")
    if eval_losses:
        eval_steps, eval_values = zip(*eval_losses)
        axes.plot(eval_steps, eval_values, color="tab:orange", marker="o", label="eval")
        axes.legend()
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("training and eval loss" if eval_losses else "training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
