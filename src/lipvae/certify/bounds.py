r"""Certified robustness bounds of docs/math.md §3: Theorem 1, Lemma 2, Theorem 3 and their inverse.

Pure NumPy/SciPy functions of numbers (no torch, no model), vectorised: every argument may
be an array and all broadcast together. Symbols are those of docs/math.md:

- ``t = ‖δ‖₂`` the perturbation size, ``r`` the reconstruction radius, ``p`` the probability;
- ``a = Lip(g)``, ``b = Lip(μ)``, ``c = Lip(σ)``;
- ``s = ‖σ(x)‖₂``, ``s_inf = ‖σ(x)‖_∞``, ``m`` the latent dimension;
- ``std_mode``: ``learned``/``bounded`` (σ depends on x) or ``fixed`` (σ ≡ γ, so c = 0,
  ``s = √m γ``, ``s_inf = γ``).

The functions take the constants as one :class:`Constants` ``(a, b, c)`` and the encoder std's
norms at x as one :class:`SigmaNorms` ``(s, s_inf, m, mode, s4)``, not as positional numbers.

Forms (``form``):

- ``paper``: Markov ``p_M = a²[(b² + c²)t² + 4cst + 4s²]/r²`` and Inglot's χ² tail bound;
- ``exact``: the paper's Markov term and the exact χ² tail ``P(χ²_m ≥ u)``;
- ``tight``: the tight Markov term ``p_M = a²[b²t² + (s + ct)² + s²]/r²`` and the best χ²
  term for the σ mode (non-central χ² for fixed σ, the exact χ² tail otherwise).

``tight`` ≥ ``exact`` ≥ ``paper`` margins everywhere.

``cantelli`` (opt-in) adds to the tight form a third term, Cantelli's inequality on
``Y = ‖z' − z‖²`` with its exact mean and variance bounded from above; it also needs
``s4 = ‖σ(x)‖₄``, so it is not a function of (s, s_inf) alone (``margin_cantelli``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, special, stats

@dataclass(frozen=True)
class Form:
    """What a closed form is made of: its Markov second moment (``paper``: ``(b² + c²)t² + 4cst +
    4s²``; ``tight``: ``b²t² + (s + ct)² + s²``) and its χ² tail (``inglot``: Inglot's bound on
    the central tail; ``central``: the exact central tail; ``best``: the non-central tail for
    fixed σ, the exact central one otherwise)."""

    markov: str
    chi2: str


#: The closed forms, each dispatched from here (the functions below read only these fields).
FORM_REGISTRY = {
    "paper": Form(markov="paper", chi2="inglot"),
    "exact": Form(markov="paper", chi2="central"),
    "tight": Form(markov="tight", chi2="best"),
}
FORMS = tuple(FORM_REGISTRY)
#: Forms that also need ``s4 = ‖σ(x)‖₄`` (docs/math.md §3, Cantelli form).
MOMENT_FORMS = ("cantelli",)
#: Forms that also sample the model (lipvae.certify.coupled), so they have no closed form in
#: (a, b, c, s) and no Theorem 3 margin; ``certify.forms`` accepts both kinds.
SAMPLED_FORMS = ("coupled",)
CERTIFY_FORMS = FORMS + MOMENT_FORMS + SAMPLED_FORMS
STD_MODES = ("learned", "bounded", "fixed")
#: Relative accuracy of every root found here (docs/math.md §3: 1e-9, never a grid).
RTOL = 1e-9
_MAX_BISECT = 400


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Constants:
    """The Lipschitz constants: ``a = Lip(g)``, ``b = Lip(μ)``, ``c = Lip(σ)`` (numbers or arrays)."""

    a: Any
    b: Any
    c: Any = 0.0


@dataclass(frozen=True)
class SigmaNorms:
    """The encoder std's norms at x: ``s = ‖σ(x)‖₂``, ``s_inf = ‖σ(x)‖_∞``, the latent dimension
    ``m``, the σ ``mode`` (``fixed`` makes c = 0) and ``s4 = ‖σ(x)‖₄`` (the Cantelli form only)."""

    s: Any
    s_inf: Any
    m: Any
    mode: str = "learned"
    s4: Any = None

    @classmethod
    def fixed(cls, gamma, m) -> "SigmaNorms":
        """σ ≡ γ: ``s = √m γ``, ``s_inf = γ``, ``s4 = m^¼ γ``."""
        gamma, mm = np.asarray(gamma, dtype=float), np.asarray(m, dtype=float)
        return cls(np.sqrt(mm) * gamma, gamma, m, "fixed", mm**0.25 * gamma)

    def c(self, k: Constants) -> np.ndarray:
        """The Lip(σ) that applies: ``k.c``, or 0 for a fixed σ."""
        c = np.asarray(k.c, dtype=float)
        return np.zeros_like(c) if self.mode == "fixed" else c


def _check_args(k: Constants, sigma: SigmaNorms, r=None, p=None, form=None, chi2=True, moments=False) -> None:
    _check(r=r, p=p, m=sigma.m, form=form, std_mode=sigma.mode, chi2=chi2, a=k.a, b=k.b, c=k.c, s=sigma.s,
           s_inf=sigma.s_inf, **({"s4": sigma.s4} if moments else {}))


# --------------------------------------------------------------------------- checks


def _check(r=None, p=None, m=None, form=None, std_mode=None, chi2=False, **nonneg) -> None:
    if r is not None and np.any(~(np.asarray(r, dtype=float) > 0)):
        raise ValueError(f"r: must be > 0, got {r}")
    if p is not None and np.any(~((np.asarray(p, dtype=float) > 0) & (np.asarray(p, dtype=float) < 1))):
        raise ValueError(f"p: must be in (0, 1), got {p}")
    if m is not None:
        m_arr = np.asarray(m)
        if np.any(m_arr < 1) or np.any(m_arr != np.round(m_arr)):
            raise ValueError(f"m: the latent dimension must be an integer >= 1, got {m}")
        if chi2 and np.any(m_arr < 2):
            raise ValueError(f"m: the χ² bound needs a latent dimension >= 2, got {m}")
    if form is not None and form not in FORM_REGISTRY:
        raise ValueError(f"form: unknown {form!r}; accepted: {', '.join(FORMS)}")
    if std_mode is not None and std_mode not in STD_MODES:
        raise ValueError(f"std_mode: unknown {std_mode!r}; accepted: {', '.join(STD_MODES)}")
    for name, value in nonneg.items():
        if value is not None and np.any(~(np.asarray(value, dtype=float) >= 0)):
            raise ValueError(f"{name}: must be >= 0 (and finite), got {value}")


# --------------------------------------------------------------------------- tail terms


def inglot_chi2_tail(u, m):
    r"""Inglot (2010) upper bound on ``P(χ²_m ≥ u)``, valid for m ≥ 2 and u > m − 2:

    ``C_m u^{m/2} e^{−u/2} / (u − m + 2)``, ``C_m = π^{−1/2} exp(½(m − (m − 1) ln m))``.

    Returns 1 outside its validity and never more than 1.
    """
    u, m = np.broadcast_arrays(np.asarray(u, dtype=float), np.asarray(m, dtype=float))
    valid = u > m - 2
    us = np.where(valid, u, m)  # any point inside the domain, to keep the logs finite
    log_c = -0.5 * np.log(np.pi) + 0.5 * (m - (m - 1) * np.log(m))
    with np.errstate(divide="ignore"):
        log_bound = log_c + 0.5 * m * np.log(us) - 0.5 * us - np.log(us - m + 2)
    return np.where(valid, np.minimum(1.0, np.exp(np.minimum(log_bound, 0.0))), 1.0)


def markov_term(t, r, k: Constants, sigma: SigmaNorms, form="tight"):
    """``p_M``: Markov's bound on ``P(‖Δ‖ > r)``, ``a² E‖z' − z‖² / r²`` with the form's second moment."""
    t, a, b, s = (np.asarray(v, dtype=float) for v in (t, k.a, k.b, sigma.s))
    c = sigma.c(k)
    if FORM_REGISTRY[form].markov == "tight":
        second_moment = b**2 * t**2 + (s + c * t) ** 2 + s**2
    else:
        second_moment = (b**2 + c**2) * t**2 + 4 * c * s * t + 4 * s**2
    return a**2 * second_moment / np.asarray(r, dtype=float) ** 2


def chi2_term(t, r, k: Constants, sigma: SigmaNorms, form="tight"):
    """``p_χ``: the χ² bound on ``P(‖Δ‖ > r)``, 1 outside the form's validity: the non-central
    tail for fixed σ in the ``tight`` form, else a central tail (``_central_chi2_term``)."""
    if sigma.mode == "fixed" and FORM_REGISTRY[form].chi2 == "best":
        return _noncentral_chi2_term(t, r, k, sigma)
    return _central_chi2_term(t, r, k, sigma, inglot=FORM_REGISTRY[form].chi2 == "inglot")


def _central_chi2_term(t, r, k: Constants, sigma: SigmaNorms, inglot: bool = False):
    """``P(χ²_m ≥ u)`` (or Inglot's bound on it) at ``u = (r/a − bt)² / v²``, with ``v² = 2γ²`` for
    fixed σ and ``(s_inf + ct)² + s_inf²`` otherwise; 1 where ``r/a ≤ bt``."""
    t, r, a, b, c, s_inf, m = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (t, r, k.a, k.b, sigma.c(k), sigma.s_inf, sigma.m))
    )
    v2 = 2 * s_inf**2 if sigma.mode == "fixed" else (s_inf + c * t) ** 2 + s_inf**2
    slack = r / a - b * t
    valid = (slack > 0) & (v2 > 0)
    u = np.where(valid, slack**2 / np.where(v2 > 0, v2, 1.0), 0.0)
    tail = inglot_chi2_tail(u, m) if inglot else special.chdtrc(m, u)
    return np.where(valid, np.clip(tail, 0.0, 1.0), 1.0)


def _noncentral_chi2_term(t, r, k: Constants, sigma: SigmaNorms):
    """Fixed σ ≡ γ: ``‖z' − z‖²/(2γ²)`` is non-central χ²_m with ``λ ≤ b²t²/(2γ²)``, whose tail
    grows with λ, at ``x = r²/(2a²γ²)``. Soundness guard: never below the central tail, and the
    exact central form where SciPy's series does not converge."""
    t, r, a, b, gamma, m = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (t, r, k.a, k.b, sigma.s_inf, sigma.m))
    )
    with np.errstate(all="ignore"):
        x = r**2 / (2 * a**2 * gamma**2)
        lam = b**2 * t**2 / (2 * gamma**2)
    central = special.chdtrc(m, x)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        nc = stats.ncx2.sf(x, m, np.where(lam > 0, lam, 1.0))
    tight = np.where(lam > 0, np.maximum(nc, central), central)
    usable = np.isfinite(nc) & np.isfinite(lam)
    if usable.all():
        return np.clip(tight, 0.0, 1.0)
    exact = _central_chi2_term(t, r, k, sigma)
    return np.clip(np.where(usable, np.minimum(tight, exact), exact), 0.0, 1.0)


# --------------------------------------------------------------------------- Theorem 1


@dataclass
class ProbBound:
    """Theorem 1: ``prob`` lower-bounds ``P(‖Δ‖ ≤ r)``; ``p_markov``, ``p_chi2`` its two terms."""

    prob: np.ndarray
    p_markov: np.ndarray
    p_chi2: np.ndarray
    robust: np.ndarray | None = None  # prob > p, when p was given


def prob_bound(t, r, k: Constants, sigma: SigmaNorms, p=None, form="tight") -> ProbBound:
    """``P(‖Δ‖₂ ≤ r) ≥ 1 − min(1, p_M, p_χ)`` (Theorem 1)."""
    _check_args(k, sigma, r=r, p=p, form=form)
    _check(t=t)
    p_m = markov_term(t, r, k, sigma, form)
    p_c = chi2_term(t, r, k, sigma, form)
    prob = 1.0 - np.minimum(1.0, np.minimum(p_m, p_c))
    return ProbBound(prob, p_m, p_c, None if p is None else prob > np.asarray(p))


# --------------------------------------------------------------------------- Lemma 2


def _quadratic_margin(A, B, C):
    """Largest t ≥ 0 with ``A t² + B t + C < 0`` (A, B ≥ 0): the positive root, 0 if C ≥ 0."""
    A, B, C = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (A, B, C)))
    disc = np.maximum(B**2 - 4 * A * C, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # (−B + √disc)/(2A) rewritten as −2C/(B + √disc): no cancellation when A is tiny.
        root = np.where(B + np.sqrt(disc) > 0, -2 * C / (B + np.sqrt(disc)), np.inf)
    return np.where(C < 0, root, 0.0)


def margin_markov(r, k: Constants, sigma: SigmaNorms, p=0.5, form="tight"):
    """Lemma 2's Markov margin ``R_M``: the largest t with ``p_M(t) < 1 − p`` (closed form).

    Paper form: ``A = b² + c², B = 4cs, C = 4s² − (1−p) r²/a²``; tight form:
    ``A = b² + c², B = 2cs, C = 2s² − (1−p) r²/a²``. ``R_M = (−B + √(B² − 4AC)) / (2A)``
    if C < 0, else 0; infinite when A = B = 0 and C < 0 (a constant encoder).
    """
    _check_args(k, sigma, r=r, p=p, form=form, chi2=False)
    a, b, s, r, p = (np.asarray(v, dtype=float) for v in (k.a, k.b, sigma.s, r, p))
    c = sigma.c(k)
    coef = 2.0 if FORM_REGISTRY[form].markov == "tight" else 4.0
    with np.errstate(divide="ignore"):
        budget = np.where(a > 0, (1 - p) * r**2 / np.where(a > 0, a, 1.0) ** 2, np.inf)
    return _quadratic_margin(b**2 + c**2, coef * c * s, coef * s**2 - budget)


def _largest_below(f, target, hi, rtol=RTOL):
    """Vectorised bisection: the largest t in ``[0, hi]`` with ``f(t) < target``, f increasing.

    0 where ``f(0) ≥ target``; ``hi`` where the bound holds all the way (inf when it never
    fails). An infinite ``hi`` is first replaced by doubling until f fails. Bisection stops
    when every bracket is narrower than ``rtol`` times its upper end and returns the lower
    end, where the bound provably holds.
    """
    shape = np.broadcast_shapes(np.shape(target), np.shape(hi), np.shape(f(np.zeros(()))))
    target = np.broadcast_to(np.asarray(target, dtype=float), shape)
    hi = np.broadcast_to(np.asarray(hi, dtype=float), shape).copy()
    holds_at_zero = f(np.zeros(shape)) < target
    probe = np.ones(shape)
    search = holds_at_zero & np.isinf(hi)
    while search.any():
        fails = f(probe) >= target
        hi = np.where(search & fails, probe, hi)
        search &= ~fails & (probe < 1e300)
        probe = np.where(search, 2.0 * probe, probe)
    finite = np.isfinite(hi)
    active = holds_at_zero & finite & (f(np.where(finite, hi, 0.0)) >= target)
    lo, up = np.zeros(shape), np.where(active, hi, 0.0)
    for _ in range(_MAX_BISECT):
        if not (active & (up - lo > rtol * up)).any():
            break
        mid = 0.5 * (lo + up)
        below = f(mid) < target
        lo = np.where(active & below, mid, lo)
        up = np.where(active & ~below, mid, up)
    return np.where(holds_at_zero, np.where(active, lo, hi), 0.0)


def margin_chi2(r, k: Constants, sigma: SigmaNorms, p=0.5, form="tight"):
    """Lemma 2's χ² margin ``R_χ``: the largest t with ``p_χ(t) < 1 − p``, by bisection to
    1e-9 relative accuracy on ``[0, r/(ab))`` (unbounded where the form allows)."""
    _check_args(k, sigma, r=r, p=p, form=form)
    r, a, b, s_inf, p = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (r, k.a, k.b, sigma.s_inf, p)))
    if sigma.mode == "fixed" and FORM_REGISTRY[form].chi2 == "best":
        # The non-central term needs no r/a > bt, but χ'²_m(λ) ≥ (its first coordinate)², so
        # p_χ ≥ Φ(√λ − √x) ≥ 1 − p once bt ≥ r/a + √2 γ Φ⁻¹(1 − p): a finite bracket.
        with np.errstate(divide="ignore"):
            reach = r / a + np.sqrt(2) * s_inf * np.maximum(special.ndtri(1 - p), 0.0)
            hi = np.where(b > 0, reach / np.where(b > 0, b, 1.0), np.inf)
    else:
        with np.errstate(divide="ignore"):
            hi = np.where(a * b > 0, r / np.where(a * b > 0, a * b, 1.0), np.inf)
    return _largest_below(lambda t: chi2_term(t, r, k, sigma, form), 1 - p, hi)


@dataclass
class Margin:
    """Lemma 2: ``margin = max(markov, chi2)`` lower-bounds the (r, p)-robustness margin."""

    margin: np.ndarray
    markov: np.ndarray
    chi2: np.ndarray


def margin(r, k: Constants, sigma: SigmaNorms, p=0.5, form="tight") -> Margin:
    """``R^{r,p}(x) ≥ max(R_M, R_χ)`` (Lemma 2). ``R > 0`` certifies x."""
    r_m = margin_markov(r, k, sigma, p, form)
    r_c = margin_chi2(r, k, sigma, p, form)
    return Margin(np.maximum(r_m, r_c), r_m, r_c)


# --------------------------------------------------------------------------- Cantelli form


def cantelli_moments(t, k: Constants, sigma: SigmaNorms):
    """Upper bounds ``(E, V)`` on the mean and variance of ``Y = ‖z' − z‖²`` at ``‖δ‖ = t``
    (docs/math.md §3, Cantelli form): ``E = b²t² + ‖σ'‖² + s²`` and ``V = 4b²t²·w + 2Q``,
    with ``‖σ'‖ ≤ s + ct``, ``w ≥ max_i(σ'_i² + σ_i²)`` and ``√Q ≥ ‖σ'‖₄² + s4²``. With learned
    or bounded σ (a sigmoid output, so every σ'_i ≤ 1) the caps ``‖σ'‖² ≤ m``, ``σ'_i ≤ 1`` and
    ``‖σ'‖₄² ≤ √m`` apply too; with fixed σ, c = 0 and nothing is capped."""
    t, b, c, s, s_inf, s4, m = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (t, k.b, sigma.c(k), sigma.s, sigma.s_inf, sigma.s4, sigma.m)))
    grow = c * t
    mean_sq, top, quart = (s + grow) ** 2, s_inf + grow, (s4 + grow) ** 2
    if sigma.mode != "fixed":  # σ' = sigmoid(·) ≤ 1 coordinatewise
        mean_sq, top, quart = np.minimum(mean_sq, m), np.minimum(top, 1.0), np.minimum(quart, np.sqrt(m))
    with np.errstate(over="ignore", invalid="ignore"):
        shift_sq = b**2 * t**2
        return shift_sq + mean_sq + s**2, 4 * shift_sq * (top**2 + s_inf**2) + 2 * (quart + s4**2) ** 2


def cantelli_term(t, r, k: Constants, sigma: SigmaNorms):
    """``p_C``: Cantelli's bound on ``P(‖Δ‖ > r) ≤ P(Y > (r/a)²)``, ``Y = ‖z' − z‖²``:
    ``V / (V + ((r/a)² − E)²)`` with ``(E, V)`` from ``cantelli_moments``; 1 where
    ``E ≥ (r/a)²``."""
    mean, var = cantelli_moments(t, k, sigma)
    r, a = np.broadcast_arrays(np.asarray(r, dtype=float), np.asarray(k.a, dtype=float))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        gap = (r / np.where(a > 0, a, 1.0)) ** 2 - mean
        tail = np.where(gap > 0, np.clip(var / (var + gap**2), 0.0, 1.0), 1.0)
    return np.where(a > 0, tail, 0.0)  # a = 0: g is constant and Δ = 0


@dataclass
class CantelliMargin:
    """The Cantelli form: ``margin = max(tight, cantelli)``, with ``tight = max(R_M, R_χ)``."""

    margin: np.ndarray
    tight: np.ndarray
    cantelli: np.ndarray


def margin_cantelli(r, k: Constants, sigma: SigmaNorms, p=0.5) -> CantelliMargin:
    """The Cantelli form's margin: ``max(R_M, R_χ, R_C)``, the tight form's two margins and
    ``R_C``, the largest t with ``p_C(t) < 1 − p`` (bisection on ``[0, r/(ab))`` as for
    ``R_χ``: at t = r/(ab), ``E ≥ (r/a)²``)."""
    _check_args(k, sigma, r=r, p=p, moments=True)
    tight = margin(r, k, sigma, p, "tight")
    r, a, b, p = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (r, k.a, k.b, p)))
    with np.errstate(divide="ignore"):
        hi = np.where(a * b > 0, r / np.where(a * b > 0, a * b, 1.0), np.inf)
    r_c = _largest_below(lambda t: cantelli_term(t, r, k, sigma), 1 - p, hi)
    return CantelliMargin(np.maximum(tight.margin, r_c), tight.margin, r_c)


# --------------------------------------------------------------------------- Theorem 3


def _worst_sigma(gamma, max_norm, m, c) -> tuple[float, SigmaNorms]:
    """The largest ``s``, ``s_inf``, ``s4`` any input can have (with the c that goes with them),
    from the configuration alone. Fixed σ ≡ ``gamma``: ``c = 0, s = √m γ, s_inf = γ,
    s4 = m^¼ γ``. Bounded σ (``‖σ(x)‖₂ ≤ max_norm``): ``s = s_inf = s4 = max_norm``, as
    ``‖·‖_∞ ≤ ‖·‖₄ ≤ ‖·‖₂``."""
    if (gamma is None) == (max_norm is None):
        raise ValueError("gamma/max_norm: give exactly one (gamma for fixed σ, max_norm for bounded σ)")
    if gamma is not None:
        _check(gamma=gamma, m=m)
        if np.any(np.asarray(gamma, dtype=float) <= 0):
            raise ValueError(f"gamma: must be > 0, got {gamma}")
        return 0.0, SigmaNorms.fixed(gamma, m)
    if np.any(~(np.asarray(max_norm, dtype=float) > 0)):
        raise ValueError(f"max_norm: must be > 0, got {max_norm}")
    return c, SigmaNorms(max_norm, max_norm, m, "bounded", max_norm)


def global_margin(a, b, gamma=None, m=10, r=8.0, p=0.5, form="tight", c=0.0, max_norm=None) -> Margin:
    """Theorem 3: the margin every input has, known from the configuration alone: Lemma 2's
    margin at the largest σ any input can have (``_worst_sigma``; give ``gamma`` for fixed σ,
    or ``max_norm`` and ``c`` for bounded σ)."""
    c, sigma = _worst_sigma(gamma, max_norm, m, c)
    return margin(r, Constants(a, b, c), sigma, p, form)


def global_margin_cantelli(a, b, gamma=None, m=10, r=8.0, p=0.5, c=0.0, max_norm=None) -> CantelliMargin:
    """Theorem 3 for the Cantelli form: every term grows with s, s_inf and s4, so the margin at
    their largest values (``_worst_sigma``) holds for every input."""
    c, sigma = _worst_sigma(gamma, max_norm, m, c)
    return margin_cantelli(r, Constants(a, b, c), sigma, p)


# --------------------------------------------------------------------------- design (inverse)


def _solve_decreasing(fn, target: float, start: float, lo: float, hi: float) -> float | None:
    """The x in [lo, hi] where the decreasing ``fn`` falls to ``target``, bracketed
    geometrically from ``start``; None if even ``fn(lo)`` is below target, ``hi`` if
    ``fn(hi)`` is still above it."""
    x = start
    if fn(x) >= target:
        while x < hi and fn(min(2 * x, hi)) >= target:
            x = min(2 * x, hi)
        if x >= hi:
            return hi
        left, right = x, min(2 * x, hi)
    else:
        while x > lo and fn(max(x / 2, lo)) < target:
            x = max(x / 2, lo)
        if x <= lo:
            return None
        left, right = max(x / 2, lo), x
    return optimize.brentq(lambda v: fn(v) - target, left, right, rtol=RTOL, xtol=1e-15)


def max_lipschitz(target, gamma, m=10, r=8.0, p=0.5, form="tight", decoder_ratio=1.0) -> float | None:
    """Largest encoder constant ``b`` (decoder ``a = decoder_ratio · b``) whose global
    margin with fixed σ ≡ γ is at least ``target``; None if no positive constant reaches it."""
    _check(target=target, gamma=gamma, r=r, p=p, m=m, form=form)

    def fn(b):
        return float(global_margin(decoder_ratio * b, b, gamma=gamma, m=m, r=r, p=p, form=form).margin)

    return _solve_decreasing(fn, target, 1.0, 1e-6, 1e6)


def max_gamma(target, a, b, m=10, r=8.0, p=0.5, form="tight") -> float | None:
    """Largest fixed encoder std γ whose global margin with constants (a, b) is at least
    ``target``; None when even γ → 0 (margin → r/(ab)) does not reach it."""
    _check(target=target, a=a, b=b, r=r, p=p, m=m, form=form)

    def fn(gamma):
        return float(global_margin(a, b, gamma=gamma, m=m, r=r, p=p, form=form).margin)

    if target >= r / (a * b):  # γ → 0 leaves the margin below r/(ab): unreachable
        return None
    return _solve_decreasing(fn, target, 0.1, 1e-6 * r / a, 1e3)
