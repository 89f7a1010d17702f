"""The benchmarks' shared timing (warm-up runs are not timed, the median is over the timed ones), and
the helpers behind `benchmarks/ceilings.py`."""

import sys

import numpy as np
import pytest

from conftest import PROJECT

sys.path.insert(0, str(PROJECT / "benchmarks"))
from timing import Timing, machine, timed  # noqa: E402


def test_timed_warms_up_then_reports_the_median_of_the_timed_runs(monkeypatch):
    import timing

    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # timed runs of 1, 3 and 2 seconds
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    t, out = timed(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and out == 5  # 2 untimed, then 3 timed; the last result returned
    assert t.runs == [1.0, 3.0, 2.0] and t.median == 2.0
    assert str(t).startswith("2 s (median of 3; 1–3)")
    with pytest.raises(ValueError, match="--repeats"):
        timed(lambda: None, repeats=0)


def test_machine_line_names_cores_threads_and_versions():
    import torch

    line = machine()
    assert line.startswith("machine: ") and " cores (" in line
    assert f"torch {torch.__version__} with {torch.get_num_threads()} threads" in line
    assert Timing([3.0, 1.0]).median == 2.0


def test_exact_law_ceiling_matches_the_closed_form_in_one_dimension():
    """m = 1, c = 0: a‖z' − z‖ = a|bt + √2σξ|, so the ceiling is the root of
    Φ((−ρ − bt)/v) + 1 − Φ((ρ − bt)/v) = 1 − p with ρ = r/a, v = √2σ; Monte Carlo within 1 %.
    (p = 0.8: at p = ½ the 1-D ceiling is ρ/b whatever σ, since a shift of ρ leaves half outside.)"""
    from scipy.optimize import brentq
    from scipy.stats import norm

    from ceilings import exact_law_ceiling

    sigma, a, b, r = np.array([[0.3], [0.8]]), 1.5, 4.0, 6.0
    got = exact_law_ceiling(sigma, a, b, 0.0, r, 0.8, pairs=40000)
    for s, t in zip(sigma[:, 0], got):
        v, rho = np.sqrt(2) * s, r / a
        exact = brentq(lambda t: norm.cdf((-rho - b * t) / v) + norm.sf((rho - b * t) / v) - 0.2, 0, 2 * rho / b)
        assert abs(t - exact) < 0.01 * exact
    # a σ that may grow (c > 0) can only lower the ceiling; capped at 1, σ = 1 cannot grow
    assert (exact_law_ceiling(sigma, a, b, 2.0, r, 0.8, pairs=40000) < got - 0.01).all()
    one = np.ones((1, 1))
    assert exact_law_ceiling(one, a, b, 2.0, r, 0.8) == exact_law_ceiling(one, a, b, 0.0, r, 0.8)


@pytest.mark.slow
def test_largest_slope_in_balls_is_a_lower_bound_that_search_raises():
    """On f(z) = sigmoid(w·z) the largest slope on a ball is σ′ at the point nearest w·z = 0:
    ¼‖w‖ when the ball reaches that hyperplane, less otherwise; sampling plus ascent comes within
    0.5 % of it, never above."""
    import torch

    from ceilings import largest_slope_in_balls

    w = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ‖w‖ = 5

    def f(z):
        return torch.sigmoid(z @ w)[None]

    centres = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # w·z = 7 and 0
    radii = torch.tensor([1.0, 0.5], dtype=torch.float64)
    got = largest_slope_in_balls(f, centres, radii, samples=50, keep=4, steps=60)
    u = torch.tensor([7.0 - 5.0, 0.0], dtype=torch.float64)  # nearest pre-activations on each ball
    exact = 5 * torch.sigmoid(u) * (1 - torch.sigmoid(u))
    assert (got <= exact * (1 + 1e-9)).all() and (got >= exact * 0.995).all()
