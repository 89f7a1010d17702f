"""Figures a researcher looks at rather than reads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def log_image(loggers, key: str, path: Path) -> None:
    for lg in loggers or []:
        if hasattr(lg, "log_image"):
            lg.log_image(key=key, images=[str(path)])


@torch.no_grad()
def save_reconstructions(vae, x: torch.Tensor, path: Path, loggers=None) -> Path:
    """Originals, reconstructions from μ(x), and from a sample z ~ q(·|x), one row each."""
    vae.eval()
    rows = {
        "input": x,
        "g(μ(x))": vae.reconstruct(x, sample=False),
        "g(z), z~q": vae.reconstruct(x, sample=True),
    }
    n = len(x)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].detach().cpu().reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log_image(loggers, "reconstructions", path)
    return path


def save_margin_histogram(margins: dict, path: Path, title: str = "", xlabel: str = "margin ‖δ‖₂") -> Path:
    """Overlaid histograms of per-input margins, one per name (e.g. per bound form)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    finite = [v[np.isfinite(v)] for v in margins.values()]
    top = max((float(v.max()) for v in finite if len(v)), default=1.0) or 1.0
    bins = np.linspace(0, top * 1.02, 40)
    for (name, values), v in zip(margins.items(), finite):
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (mean {np.mean(v):.3g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("inputs")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
