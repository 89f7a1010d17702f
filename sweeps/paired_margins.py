"""Paired comparison of estimated margins against a sweep's standard VAE.

Every run of a sweep attacks the same first test inputs, so each Lipschitz model can be compared
with the standard VAE input by input: the mean difference of their estimated margins, a 95 %
bootstrap interval for it (10,000 resamples of the inputs, seed 0), and on how many inputs the
Lipschitz model's margin is the larger one.

    python sweeps/paired_margins.py outputs/multirun/fig5/<date>/<time>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def load(run: Path) -> tuple[dict, pd.Series] | None:
    results = run / "results.json"
    if not results.is_file():
        return None
    r = json.loads(results.read_text())
    table = (r.get("estimated") or {}).get("table")
    if r.get("status") != "completed" or not table or not (run / table).is_file():
        return None
    margins = pd.read_csv(run / table).set_index("index")["estimated"]
    return r, margins


def compare(sweep: Path, resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
    runs = {p.parent: got for p in sorted(sweep.glob("*/results.json")) if (got := load(p.parent))}
    standard = [m for r, m in runs.values() if r["model"]["kind"] == "standard"]
    if len(standard) != 1:
        raise SystemExit(f"error: {sweep}: found {len(standard)} completed standard VAE runs; need exactly one")
    base = standard[0]
    rng = np.random.default_rng(seed)
    rows = []
    for run, (r, margins) in runs.items():
        if r["model"]["kind"] == "standard":
            continue
        common = margins.index.intersection(base.index)
        diff = (margins[common] - base[common]).to_numpy()
        boot = rng.choice(diff, size=(resamples, len(diff))).mean(axis=1)
        rows.append({
            "run": run.name,
            "L": f'{r["config"].get("enc_L"):g}',
            "inputs": len(diff),
            "mean_difference": diff.mean(),
            "ci_low": np.percentile(boot, 2.5),
            "ci_high": np.percentile(boot, 97.5),
            "larger_on": int((diff > 0).sum()),
        })
    return pd.DataFrame(rows).sort_values("L", key=lambda c: c.astype(float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    args = ap.parse_args()
    print(compare(args.sweep).to_string(index=False, float_format=lambda v: f"{v:+.3f}"))


if __name__ == "__main__":
    main()
