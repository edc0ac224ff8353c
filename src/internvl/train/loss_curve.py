"""The loss curve of a run, drawn to a PNG."""

from __future__ import annotations

import os


def write_loss_curve(losses: list[tuple[int, float]], path: str | os.PathLike, title: str = "training loss") -> None:
    """Plot (step, loss) pairs to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib import pyplot as plt

    steps, values = zip(*losses)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot(steps, values, color="tab:blue")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
