"""How tight Theorem 1's two tail terms are (paper Fig. 2).

Both terms bound ``P(‖Δ‖ > r)`` through ``P(‖z' − z‖ > r/a)``, where
``z' − z ~ N(μ(x+δ) − μ(x), diag(σ(x+δ)² + σ(x)²))`` is a *generalised* χ² variable. For a
perturbation of size t the constants allow, among others, the configuration

- ``μ(x+δ) − μ(x) = b·t·e`` with e the unit vector of σ(x)'s largest coordinate, and
- ``σ(x+δ) = σ(x)·(1 + c·t/s)`` (σ grown along itself, so ``‖σ(x+δ) − σ(x)‖ = c·t``),

whose tail is estimated here by Monte Carlo and drawn under the bounds: the gap is what a
certificate gives away. The bounds must lie above the Monte Carlo curve everywhere (up to
sampling error), since this configuration is one the bounds cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipvae.certify.bounds import FORMS, Constants, SigmaNorms, chi2_term, markov_term


@dataclass
class Setting:
    """One panel row: the constants, the encoder std σ(x) (a vector) and r, and a title."""

    title: str
    r: float
    a: float
    b: float
    c: float
    sigma: np.ndarray
    std_mode: str = "learned"  # "fixed" uses γ = sigma[0] and c = 0

    @property
    def m(self) -> int:
        return len(self.sigma)

    @property
    def c_used(self) -> float:
        """Lip(σ) as the bounds use it: 0 when σ is fixed."""
        return 0.0 if self.std_mode == "fixed" else self.c

    @property
    def s(self) -> float:
        return float(np.linalg.norm(self.sigma))


def paper_settings() -> list[Setting]:
    """The paper's setting (m = 10, r = 8, L = 5 so a = 5/4, b = 5, c = 5/4, σ ≡ 0.1) and a
    second one: a 2-D latent space, L = 10, and an uneven learned σ."""
    return [
        Setting("m=10, r=8, L=5, learned σ(x) = 0.1", 8.0, 1.25, 5.0, 1.25, np.full(10, 0.1)),
        Setting("m=10, r=8, L=5, fixed σ ≡ γ = 0.1", 8.0, 1.25, 5.0, 0.0, np.full(10, 0.1), "fixed"),
        Setting("m=2, r=4, L=10, learned σ(x) = (0.3, 0.05)", 4.0, 2.5, 10.0, 2.5, np.array([0.3, 0.05])),
    ]


def monte_carlo_tail(setting: Setting, ts: np.ndarray, samples: int = 100_000, seed: int = 0) -> np.ndarray:
    """``P̂(‖z' − z‖ > r/a)`` at each t for the configuration in the module docstring."""
    rng = np.random.default_rng(seed)
    sigma = np.asarray(setting.sigma, dtype=float)
    c, s = setting.c_used, setting.s
    e = np.zeros_like(sigma)
    e[np.argmax(sigma)] = 1.0
    xi = rng.standard_normal((samples, len(sigma)))
    out = np.empty(len(ts))
    for k, t in enumerate(ts):
        scale = np.sqrt((sigma * (1 + c * t / s)) ** 2 + sigma**2)
        diff = setting.b * t * e + xi * scale
        out[k] = np.mean(np.linalg.norm(diff, axis=1) > setting.r / setting.a)
    return out


def curves(
    setting: Setting, form: str, ts: np.ndarray, samples: int = 100_000, seed: int = 0, tail: np.ndarray | None = None
) -> dict:
    """Markov term, χ² term, Theorem 1's bound (their minimum, capped at 1) and the Monte
    Carlo tail, each an array over ``ts``. The tail does not depend on the form: pass it as
    ``tail`` when it is already known."""
    c, s_inf = setting.c_used, float(np.max(setting.sigma))
    k, sigma = Constants(setting.a, setting.b, c), SigmaNorms(setting.s, s_inf, setting.m, setting.std_mode)
    p_m = markov_term(ts, setting.r, k, sigma, form)
    p_c = chi2_term(ts, setting.r, k, sigma, form)
    return {
        "t": ts,
        "markov": np.minimum(p_m, 1.0),
        "chi2": np.minimum(p_c, 1.0),
        "bound": np.minimum(1.0, np.minimum(p_m, p_c)),
        "monte_carlo": monte_carlo_tail(setting, ts, samples, seed) if tail is None else tail,
    }


def save_tightness_figure(path: Path, settings: list[Setting] | None = None, samples: int = 100_000) -> Path:
    """A grid of panels, one row per setting and one column per form."""
    from lipvae.plots import plt, save_figure

    settings = settings or paper_settings()
    fig, axes = plt.subplots(len(settings), len(FORMS), figsize=(3.3 * len(FORMS), 2.6 * len(settings)), squeeze=False)
    for i, setting in enumerate(settings):
        ts = np.linspace(0, 1.2 * setting.r / (setting.a * setting.b), 60)
        tail = monte_carlo_tail(setting, ts, samples)
        for j, form in enumerate(FORMS):
            ax = axes[i][j]
            cur = curves(setting, form, ts, tail=tail)
            ax.plot(ts, cur["markov"], label="Markov term", color="tab:orange")
            ax.plot(ts, cur["chi2"], label="χ² term", color="tab:green")
            ax.plot(ts, cur["monte_carlo"], label="Monte Carlo tail", color="k", lw=1.5, ls="--")
            ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="1 − p at p = ½")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{form} form\n{setting.title}", fontsize=8)
            ax.set_xlabel("perturbation size t = ‖δ‖₂", fontsize=8)
            if j == 0:
                ax.set_ylabel("bound on P(‖Δ‖ > r)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
