"""The benchmarks' shared timing: warm-up runs are not timed, the median is over the timed ones."""

import sys

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
