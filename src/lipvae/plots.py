"""Figures a researcher looks at rather than reads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _log_image(loggers, key: str, path: Path) -> None:
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
    _log_image(loggers, "reconstructions", path)
    return path
