"""Paired comparison of estimated margins against the standard VAE, seed by seed (paper Fig. 5).

Every run of a sweep attacks the same first test inputs, so each Lipschitz model can be compared
with the standard VAE input by input: the mean difference of their estimated margins (Lipschitz
minus standard), a 95 % bootstrap interval for it (resampling the inputs) and on how many inputs
the Lipschitz model's margin is the larger. Each Lipschitz run is paired with the standard VAE of
its own seed whose margins were measured on the same inputs (``measured_on``: the data read, by
its digests, and the attack's r and p); runs of other data or another r are never paired. Over
seeds, a verdict per L: "more robust" when every seed's interval lies above 0, "less robust" when
every one lies below, "undecided" otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Arm:
    """One run's part in the comparison: its estimated margins indexed by test input."""

    name: str
    kind: str  # "lipschitz" or "standard"
    L: float | None
    seed: int
    margins: pd.Series
    inputs: str = ""  # what the margins were measured on (``measured_on``); only equal ones pair
    censored: pd.Series | None = None  # by input: the attack reached its max_radius (a lower bound)

    @classmethod
    def of_table(cls, name: str, kind: str, L: float | None, seed: int, table: pd.DataFrame, inputs: str) -> Arm:
        """An arm from a run's margins table (``margins.csv``, indexed by ``index``): its estimated
        margins and, where the table has them, their censoring flags."""
        return cls(name, kind, L, seed, table["estimated"], inputs, table["censored"] if "censored" in table else None)


def measured_on(data: dict | None, estimated: dict | None) -> str:
    """What a run's estimated margins were measured on, from its results.json ``data`` and
    ``estimated``: the data set and the digests of what was read (a margin table's ``index``
    counts in those sources), and the attack's r and p."""
    data, estimated = data or {}, estimated or {}
    return json.dumps([data.get("name"), data.get("sources"), estimated.get("r"), estimated.get("p")], sort_keys=True)


def inputs_words(inputs: str) -> str:
    """A ``measured_on`` key in words: the data set and the attack's r and p."""
    try:
        name, _, r, p = json.loads(inputs)
        return f"{name}, r={r:g}, p={p:g}"
    except (ValueError, TypeError):
        return "other inputs"


def unpaired_seeds(arms: list[Arm]) -> list[int]:
    """The seeds of Lipschitz runs without exactly one standard VAE of the same seed measured on
    the same inputs."""
    standard = Counter((a.inputs, a.seed) for a in arms if a.kind == "standard")
    return sorted({a.seed for a in arms if a.kind == "lipschitz" and standard[(a.inputs, a.seed)] != 1})


def differences(arms: list[Arm], resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """One row per Lipschitz run paired with its seed's standard VAE on the same inputs (each must
    have exactly one: ``unpaired_seeds`` is empty), sorted by L and seed."""
    bases = {(a.inputs, a.seed): a for a in arms if a.kind == "standard"}
    rng = np.random.default_rng(seed)
    rows = []
    for arm in arms:
        if arm.kind == "standard":
            continue
        base = bases[(arm.inputs, arm.seed)]
        common = arm.margins.index.intersection(base.margins.index)
        diff = (arm.margins[common] - base.margins[common]).to_numpy(dtype=float)
        boot = rng.choice(diff, size=(resamples, len(diff))).mean(axis=1)
        rows.append({"run": arm.name, "L": f"{arm.L:g}", "seed": arm.seed, "inputs": len(diff),
                     "lipschitz_mean": float(arm.margins[common].mean()),
                     "standard_mean": float(base.margins[common].mean()),
                     "mean_difference": float(diff.mean()), "ci_low": float(np.percentile(boot, 2.5)),
                     "ci_high": float(np.percentile(boot, 97.5)), "larger_on": int((diff > 0).sum()),
                     "lipschitz_censored": _censored(arm, common), "standard_censored": _censored(base, common)})
    table = pd.DataFrame(rows, columns=["run", "L", "seed", "inputs", "lipschitz_mean", "standard_mean",
                                        "mean_difference", "ci_low", "ci_high", "larger_on", "lipschitz_censored",
                                        "standard_censored"])
    return table.sort_values(["L", "seed"], key=lambda c: c.astype(float)).reset_index(drop=True)


def _censored(arm: Arm, common) -> int:
    return 0 if arm.censored is None else int(arm.censored.reindex(common, fill_value=False).astype(bool).sum())


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per L, over its seeds: the mean and range of the paired differences and a verdict. A
    censored margin is a lower bound, so it can only move a difference one way: censored standard
    margins leave "more robust" unproven, censored Lipschitz ones "less robust" (then: undecided,
    saying why)."""
    rows = []
    for L, group in table.groupby("L", sort=False):
        above, below = int((group.ci_low > 0).sum()), int((group.ci_high < 0).sum())
        n = len(group)
        verdict = "more robust" if above == n else "less robust" if below == n else "undecided"
        blocked = {"more robust": ("standard_censored", "standard VAE"),
                   "less robust": ("lipschitz_censored", "Lipschitz")}.get(verdict)
        if blocked and group[blocked[0]].sum() > 0:
            verdict = f"undecided ({blocked[1]} margins censored)"
        rows.append({"L": L, "seeds": n, "mean_difference": group.mean_difference.mean(),
                     "lowest": group.mean_difference.min(), "highest": group.mean_difference.max(),
                     "seeds_above_0": above, "seeds_below_0": below, "verdict": verdict})
    return pd.DataFrame(rows)


def undecided_arms(table: pd.DataFrame) -> list[str]:
    """The Lipschitz arms (as ``variant`` names) with a seed whose 95 % interval includes 0."""
    open_ = table[(table.ci_low <= 0) & (table.ci_high >= 0)]
    return [f"lipschitz_L{L}" for L in dict.fromkeys(open_.L)]
