"""Figures a researcher looks at rather than reads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close a figure (written beside ``path`` and renamed over it:
    a symlink planted at ``path`` is replaced, never followed)."""
    from lipvae.results import replace_atomically

    path = Path(path)
    fig.tight_layout()
    try:
        replace_atomically(path, lambda partial: fig.savefig(partial, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path


def as_image(v: torch.Tensor, shape) -> np.ndarray:
    """A flat input as an image to show: ``shape`` (C, H, W) gives H × W (one channel), H × W × 3
    (RGB, or RGBA without its alpha) or, for other channel counts, the channels side by side in
    grey (H × C·W); a flat shape (D,) a square when D is one, else a 1 × D strip."""
    v = v.detach().cpu().to(torch.float32)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        img = v.reshape(shape)
        if shape[0] in (3, 4):
            return img.permute(1, 2, 0)[..., :3].numpy()
        return torch.cat(list(img), dim=1).numpy()  # one channel: itself
    side = int(round(v.numel() ** 0.5))
    return v.reshape(side, side).numpy() if side * side == v.numel() else v.reshape(1, -1).numpy()


def _show(ax, v: torch.Tensor, shape) -> None:
    ax.imshow(as_image(v, shape), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def is_wandb(logger) -> bool:
    """Whether a Lightning logger is the W&B one (imported lazily: W&B is optional at run time)."""
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


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
            _show(axes[r][c], images[c], vae.input_shape)
        axes[r][0].set_ylabel(title, fontsize=8)
    save_figure(fig, path)
    log_image(loggers, "reconstructions", path)
    return path


def save_margin_histogram(margins: dict, path: Path, title: str = "", xlabel: str = "margin ‖δ‖₂") -> Path:
    """Overlaid histograms of per-input margins, one per name (e.g. per bound form)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    finite = [v[np.isfinite(v)] for v in margins.values()]
    top = max((float(v.max()) for v in finite if len(v)), default=1.0) or 1.0
    bins = np.linspace(0, top * 1.02, 40)
    for (name, values), v in zip(margins.items(), finite):
        ax.hist(v, bins=bins, alpha=0.5, histtype="stepfilled", label=f"{name} (mean {np.mean(v):.3g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("inputs")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_margin_scatter(table, certified_columns, path: Path, title: str = "") -> Path:
    """Certified (y) vs estimated (x) margin per input, one colour per form, with the
    diagonal: every filled point must lie on or below it (paper Fig. 4, axes as there). A
    censored estimate (still robust at the attack's largest radius) is an open marker: its
    margin is at least x, so it may lie above."""
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    est = table["estimated"].to_numpy()
    censored = table["censored"].to_numpy(dtype=bool) if "censored" in table else np.zeros(len(est), dtype=bool)
    top = 1.05 * max(float(np.nanmax(est)), float(np.nanmax(table[certified_columns].to_numpy())), 1e-3)
    for col in certified_columns:
        cert, form = table[col].to_numpy(), col.removeprefix("certified_")
        dots = ax.scatter(est[~censored], cert[~censored], s=14, alpha=0.7, label=form if not censored.all() else None)
        if censored.any():
            ax.scatter(est[censored], cert[censored], s=14, facecolors="none", edgecolors=dots.get_facecolor()[:1],
                       label=f"{form}, censored (margin ≥ x)")
    ax.plot([0, top], [0, top], "k--", lw=1, label="certified = estimated")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("estimated margin (attack)")
    ax.set_ylabel("certified margin (bound)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


@torch.no_grad()
def save_latent_attack(x, attack, target, path: Path, budget: float | None, shape=None) -> Path:
    """Paper Fig. 1: original, adversarial input, its reconstruction, target; a row per input.
    ``budget``: the hard attack's C; None for the soft attack (each row shows its ‖δ‖);
    ``shape``: the inputs' (C, H, W)."""
    shape = shape or (x.shape[-1],)
    cols = {
        "original": x,
        f"adversarial (‖δ‖≤{budget:g})" if budget is not None else "adversarial (soft)": attack.adversarial,
        "reconstruction": attack.reconstruction,
        "target": target,
    }
    n = len(x)
    fig, axes = plt.subplots(n, len(cols), figsize=(1.5 * len(cols), 1.4 * n), squeeze=False)
    for c, (title, images) in enumerate(cols.items()):
        for r in range(n):
            _show(axes[r][c], images[r], shape)
        axes[0][c].set_title(title, fontsize=7)
    for r in range(n):
        if budget is None:
            axes[r][1].set_xlabel(f"‖δ‖ = {attack.delta[r].norm():.2f}", fontsize=6)
        axes[r][2].set_xlabel(
            f"to target {attack.dist_to_target[r]:.2f}\nto original {attack.dist_to_original[r]:.2f}", fontsize=6
        )
    return save_figure(fig, path)


@torch.no_grad()
def save_aggregate_posterior(vae, x: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """Paper Fig. 6: posterior means μ(x) of test inputs in a 2-D latent space, by class (one
    colour for data without labels, which are -1), with the prior's 1σ and 2σ circles."""
    vae.eval()
    mu = torch.cat([vae.encode(chunk).mean for chunk in torch.split(x, 1000)]).cpu()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    labelled = bool((labels >= 0).any())
    sc = ax.scatter(mu[:, 0], mu[:, 1], c=labels.cpu() if labelled else "tab:blue", cmap="tab10" if labelled else None,
                    s=4, alpha=0.7)
    theta = np.linspace(0, 2 * np.pi, 200)
    for k in (1, 2):
        ax.plot(k * np.cos(theta), k * np.sin(theta), "k--", lw=0.8)
    ax.set_aspect("equal")
    ax.set_xlabel("z₁")
    ax.set_ylabel("z₂")
    ax.set_title("aggregate posterior (dashed: prior 1σ, 2σ)", fontsize=9)
    if labelled:
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04, label="class")
    return save_figure(fig, path)


@torch.no_grad()
def save_prior_samples(vae, path: Path, n: int = 8, generator: torch.Generator | None = None) -> Path:
    """Paper Fig. 7: decoder means g(z) of z ~ N(0, I), an n × n grid."""
    vae.eval()
    device = next(vae.parameters()).device
    z = torch.randn(n * n, vae.latent_dim, generator=generator).to(device)
    tiles = [as_image(v, vae.input_shape) for v in vae.decode(z).cpu()]
    rows = [np.concatenate(tiles[i * n:(i + 1) * n], axis=1) for i in range(n)]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("samples g(z), z ~ N(0, I)", fontsize=9)
    return save_figure(fig, path)
