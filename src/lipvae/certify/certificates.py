"""Certified margins of a trained (frozen) VAE, per input, from its *measured* constants.

``a = Lip(g)``, ``b = Lip(μ)``, ``c = Lip(σ)`` are the measured bounds of docs/math.md §1 (sigmoid
heads included); ``s = ‖σ(x)‖₂`` and ``s_inf = ‖σ(x)‖_∞`` come from one encoder pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product

import numpy as np
import pandas as pd
import torch

from lipvae.certify.bounds import (
    FORMS,
    MOMENT_FORMS,
    SAMPLED_FORMS,
    Constants,
    SigmaNorms,
    global_margin,
    global_margin_cantelli,
    margin,
    margin_cantelli,
)
from lipvae.certify.coupled import coupled_margin, dkw_width, self_damage
from lipvae.networks import cpu_float64
from lipvae.safety import packaged_config

log = logging.getLogger("lipvae")
#: A measured constant above nominal by more than this (relative; float rounding is ~1e-7) is
#: reported as an error: the network does not have the constant the user asked for.
LIPSCHITZ_TOLERANCE = 1e-5


#: The coupled form's Monte Carlo: pairs per input, the certificate's failure probability, seed:
#: the ``certify.coupled`` settings a run gets, so that a caller of ``certify`` who passes none
#: gets the same ones.
COUPLED_DEFAULTS = dict(packaged_config("certify", "default.yaml")["coupled"])


def check_lipschitz(constants: dict) -> list[str]:
    """Warn, naming the network, where a measured constant exceeds its nominal one; returns them."""
    bound, measured = constants.get("bound"), constants.get("measured")
    if not bound:
        return []
    above = []
    for net, value in measured.items():
        limit = bound[net]
        if value > limit * (1 + LIPSCHITZ_TOLERANCE):
            above.append(net)
            log.error(
                "Lipschitz constant NOT kept: the measured bound of %s is %.6g, above the %.6g asked for;"
                " certificates use the measured one",
                net,
                value,
                limit,
            )
    return above


@torch.no_grad()
def encoder_std_norms(vae, x: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``s = ‖σ(x)‖₂``, ``s_inf = ‖σ(x)‖_∞`` and ``s4 = ‖σ(x)‖₄`` for every row of ``x``, batched."""
    was_training = vae.training
    vae.eval()
    norms = []
    device = next(vae.parameters()).device
    for chunk in torch.split(x, batch_size):
        std = cpu_float64(vae.encode(chunk.to(device)).std)
        norms.append(torch.stack([std.norm(dim=-1), std.amax(dim=-1), std.norm(p=4, dim=-1)]))
    vae.train(was_training)
    s, s_inf, s4 = torch.cat(norms, dim=1).numpy()
    return s, s_inf, s4


def column_suffix(r_list, p_list, r: float, p: float) -> str | None:
    """Suffix of the table columns computed at (r, p): none for the first (primary) pair of
    ``product(r_list, p_list)``, ``_r<r>_p<p>`` for the others; None if (r, p) is not there."""
    pairs = [(float(a), float(b)) for a, b in product(r_list, p_list)]
    if (float(r), float(p)) not in pairs:
        return None
    return "" if pairs.index((float(r), float(p))) == 0 else f"_r{r:g}_p{p:g}"


def _stats(values: np.ndarray) -> dict:
    return {
        "mean": float(np.mean(values)),
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "fraction_certified": float(np.mean(values > 0)),
    }


def certify(
    vae,
    x: torch.Tensor,
    index: np.ndarray,
    labels: np.ndarray,
    constants: dict,
    r: list[float],
    p: list[float],
    forms: list[str],
    batch_size: int = 1000,
    coupled: dict | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Per-input Lemma 2 margins for every (r, p, form), and a summary for results.json.

    The first (r, p) and the first form are the primary ones: their columns are
    ``R_M_<form>``, ``R_chi2_<form>``, ``certified_<form>``; other (r, p) pairs add the
    suffix ``_r<r>_p<p>``. The summary's top-level numbers are the primary form's.
    The ``coupled`` form (settings ``coupled``: samples, alpha, seed) writes ``tau_coupled``
    and ``certified_coupled`` instead (lipvae.certify.coupled); the ``cantelli`` form writes
    ``R_C_cantelli`` (its Cantelli term's margin; certified is the larger of it and the tight
    form's) and ``certified_cantelli``, and adds the column ``s_4 = ‖σ(x)‖₄``.
    """
    measured = constants["measured"]
    a, b, c = measured["decoder"], measured["encoder_mean"], measured["encoder_std"]
    m = vae.latent_dim
    s, s_inf, s4 = encoder_std_norms(vae, x, batch_size)
    table = pd.DataFrame({"index": index, "label": labels, "s": s, "s_inf": s_inf})
    if any(form in MOMENT_FORMS for form in forms):
        table["s_4"] = s4
    damages = None
    if any(form in SAMPLED_FORMS for form in forms):
        coupled = {**COUPLED_DEFAULTS, **(coupled or {})}
        device = next(vae.parameters()).device
        gen = torch.Generator(device=device).manual_seed(int(coupled["seed"]))
        damages = self_damage(vae, x, int(coupled["samples"]), gen)
    given = _Given(Constants(a, b, c), SigmaNorms(s, s_inf, m, vae.std_mode, s4), damages,
                   float(coupled["alpha"]) if damages is not None else None)
    by = {}
    for rr, pp in product(r, p):
        sfx = column_suffix(r, p, rr, pp)
        key = f"r{rr:g}_p{pp:g}"
        by[key] = {}
        for form in forms:
            certified, columns = CERTIFIERS[form](given, rr, pp, form)
            for name, values in columns.items():
                table[f"{name}_{form}{sfx}"] = values
            table[f"certified_{form}{sfx}"] = certified
            global_ = None if form in SAMPLED_FORMS else _global(vae, a, b, c, rr, pp, form)  # no Theorem 3 analogue
            by[key][form] = {**_stats(certified), "global_margin": global_}
    primary = by[f"r{r[0]:g}_p{p[0]:g}"][forms[0]]
    summary = {
        "r": float(r[0]),
        "p": float(p[0]),
        "form": forms[0],
        "num_inputs": int(len(table)),
        **primary,
        "constants": {"a": a, "b": b, "c": c, "m": m},
        "by_r_p_form": by,
    }
    # the primary form's guarantee: 1 for a proof; 1 - alpha for the coupled form, which holds per
    # input with that probability over the certifier's own samples
    summary["holds_with_probability"] = 1.0 - float(coupled["alpha"]) if forms[0] in SAMPLED_FORMS else 1.0
    if damages is not None:
        summary["coupled"] = {**coupled, "dkw_width": dkw_width(int(coupled["samples"]), float(coupled["alpha"]))}
        table["coupled_holds_with_probability"] = 1.0 - float(coupled["alpha"])
    return table, summary


@dataclass
class _Given:
    """What every form's certificate is computed from: the measured constants, the σ norms per
    input, and (coupled form) the sorted self-damages and the failure probability α."""

    k: Constants
    sigma: SigmaNorms
    damages: np.ndarray | None
    alpha: float | None


def _closed_form(given: _Given, r: float, p: float, form: str):
    res = margin(r, given.k, given.sigma, p, form)
    return res.margin, {"R_M": res.markov, "R_chi2": res.chi2}


def _cantelli_form(given: _Given, r: float, p: float, form: str):
    res = margin_cantelli(r, given.k, given.sigma, p)
    return res.margin, {"R_C": res.cantelli}


def _coupled_form(given: _Given, r: float, p: float, form: str):
    k = given.k
    certified, tau = coupled_margin(given.damages, k.a, k.b, k.c, given.sigma.m, r, p, given.alpha)
    return certified, {"tau": tau}


#: Every form of ``certify.forms`` and the function that certifies with it: ``(given, r, p, form)``
#: → (certified margins, the form's other columns by name).
CERTIFIERS = {**{form: _closed_form for form in FORMS}, "cantelli": _cantelli_form, "coupled": _coupled_form}
assert set(CERTIFIERS) == set(FORMS + MOMENT_FORMS + SAMPLED_FORMS)


def certify_test_split(vae, test, num_inputs, constants, r, p, forms, batch_size=1000, coupled=None):
    """``certify`` on the first ``num_inputs`` (all when None) inputs of a test split."""
    n = len(test) if num_inputs is None else min(num_inputs, len(test))
    return certify(
        vae, test.images[:n], test.index[:n].numpy(), test.labels[:n].numpy(), constants, r, p, forms, batch_size,
        coupled,
    )


class Certifier:
    """The certify group's object (``conf/certify/default.yaml``, built by ``instantiate``): the
    certified margins at every (r, p) of ``r`` × ``p`` for each of ``forms`` (the first form and
    the first (r, p) are summarised); ``coupled``: the coupled form's samples, alpha and seed."""

    def __init__(self, r=(8.0,), p=(0.5,), forms=("tight", "exact", "paper"), coupled: dict | None = None) -> None:
        self.r, self.p, self.forms = [float(v) for v in r], [float(v) for v in p], list(forms)
        self.coupled = dict(coupled) if coupled is not None else None

    def certify_split(self, vae, test, num_inputs: int | None, batch_size: int = 1000):
        """The certified-margin table and summary of the first ``num_inputs`` (None: all) inputs
        of a test split, from the VAE's measured constants."""
        return certify_test_split(vae, test, num_inputs, vae.lipschitz_constants(), self.r, self.p, self.forms,
                                  batch_size, self.coupled)


def computed_gamma(vae) -> float:
    """The fixed σ the model actually computes with: γ rounded to the model's dtype (float32(0.1)
    is 0.10000000149 > 0.1, and a certificate may not rely on the nominal value)."""
    return float(torch.tensor(vae.gamma, dtype=vae.dtype).item())


def max_norm_bound(vae) -> float:
    """An upper bound on ``‖σ(x)‖₂`` as the model computes the bounded-σ projection in its dtype.

    ``σ · fl(max_norm / fl(‖σ‖))``, rounded per coordinate, can exceed ``max_norm``: the norm's
    relative rounding error is at most ``γ_m ≈ m·u`` for any summation order, the division and
    the product add ``u`` each (``u`` the unit roundoff), so ``‖σ'‖ ≤ max_norm (1 + u)² / (1 − γ_m)``.
    Rounded up generously to ``max_norm · (1 + 2 (m + 2) u)`` (docs/math.md)."""
    u = torch.finfo(vae.dtype).eps / 2
    bound = float(vae.max_norm) * (1.0 + 2.0 * (vae.latent_dim + 2) * u)
    return float(np.nextafter(bound, np.inf))


def _global(vae, a, b, c, r, p, form) -> float | None:
    """Theorem 3's margin, when σ is fixed or bounded; None when σ is learned. It uses the σ the
    model actually computes (``computed_gamma``) or an upward-rounded bound on it (``max_norm_bound``)."""
    if vae.std_mode == "learned":
        return None
    given = {"gamma": computed_gamma(vae)} if vae.std_mode == "fixed" else {"c": c, "max_norm": max_norm_bound(vae)}
    if form in MOMENT_FORMS:
        return float(global_margin_cantelli(a, b, m=vae.latent_dim, r=r, p=p, **given).margin)
    return float(global_margin(a, b, m=vae.latent_dim, r=r, p=p, form=form, **given).margin)
