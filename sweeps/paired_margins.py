"""Paired comparison of estimated margins against the standard VAE, seed by seed.

Every run attacks the same first test inputs, so each Lipschitz model can be compared with the
standard VAE input by input: the mean difference of their estimated margins (Lipschitz minus
standard), a 95 % bootstrap interval for it (10,000 resamples of the inputs, seed 0), and on how
many inputs the Lipschitz model's margin is the larger one. Each Lipschitz run is paired with
the standard VAE of its own seed. With several seeds, a summary per L gives the spread of the
per-seed differences and a verdict: "more robust" when every seed's interval lies above 0,
"less robust" when every one lies below, "undecided" otherwise.

    python sweeps/paired_margins.py <folder> [<folder> ...] [--standard <folder>]

Runs are found anywhere below the folders. ``--standard`` takes the standard VAEs from that
folder alone (when the folders hold more than one per seed).
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
    try:
        r = json.loads(results.read_text())
    except ValueError:
        return None
    table = (r.get("estimated") or {}).get("table")
    if r.get("status") != "completed" or not table or not (run / table).is_file():
        return None
    margins = pd.read_csv(run / table).set_index("index")["estimated"]
    return r, margins


def _seed(r: dict) -> int:
    return int((r.get("config") or {}).get("seed", 0) or 0)


def _runs(folders) -> dict:
    found = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("results.json")):
            if "evaluations" not in p.parts and (got := load(p.parent)):
                found[p.parent] = got
    return found


def compare(*sweeps: Path, standard: Path | None = None, resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """One row per Lipschitz run: its paired difference against the standard VAE of its seed."""
    runs = _runs(sweeps)
    pool = _runs([standard]) if standard is not None else runs
    bases: dict[int, list] = {}
    for run, (r, m) in pool.items():
        if r["model"]["kind"] == "standard":
            bases.setdefault(_seed(r), []).append((run, m))
    rng = np.random.default_rng(seed)
    rows = []
    for run, (r, margins) in runs.items():
        if r["model"]["kind"] == "standard":
            continue
        s = _seed(r)
        found = bases.get(s, [])
        if len(found) != 1:
            where = standard if standard is not None else ", ".join(map(str, sweeps))
            raise SystemExit(f"error: {where}: found {len(found)} completed standard VAE runs with seed {s}; need"
                             " exactly one (choose with --standard)")
        base = found[0][1]
        common = margins.index.intersection(base.index)
        diff = (margins[common] - base[common]).to_numpy()
        boot = rng.choice(diff, size=(resamples, len(diff))).mean(axis=1)
        rows.append({
            "run": run.name,
            "L": f'{r["config"].get("enc_L"):g}',
            "seed": s,
            "inputs": len(diff),
            "lipschitz_mean": float(margins[common].mean()),
            "standard_mean": float(base[common].mean()),
            "mean_difference": diff.mean(),
            "ci_low": np.percentile(boot, 2.5),
            "ci_high": np.percentile(boot, 97.5),
            "larger_on": int((diff > 0).sum()),
        })
    table = pd.DataFrame(rows)
    return table.sort_values(["L", "seed"], key=lambda c: c.astype(float)).reset_index(drop=True)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per L, over its seeds: the mean and range of the paired differences and a verdict."""
    rows = []
    for L, group in table.groupby("L", sort=False):
        above, below = int((group.ci_low > 0).sum()), int((group.ci_high < 0).sum())
        n = len(group)
        verdict = "more robust" if above == n else "less robust" if below == n else "undecided"
        rows.append({"L": L, "seeds": n, "mean_difference": group.mean_difference.mean(),
                     "lowest": group.mean_difference.min(), "highest": group.mean_difference.max(),
                     "seeds_above_0": above, "seeds_below_0": below, "verdict": verdict})
    return pd.DataFrame(rows)


def undecided_arms(table: pd.DataFrame) -> list[str]:
    """The Lipschitz arms (as ``variant`` names) with a seed whose paired 95 % interval includes
    0: the ones the paper's reproduction gives more seeds (``sweeps/paper.sh``)."""
    open_ = table[(table.ci_low <= 0) & (table.ci_high >= 0)]
    return [f"lipschitz_L{L}" for L in dict.fromkeys(open_.L)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", type=Path, nargs="+")
    ap.add_argument("--standard", type=Path, default=None, help="take the standard VAEs from this folder alone")
    ap.add_argument("--undecided", action="store_true",
                    help="print only the arms with a seed whose interval includes 0, comma-separated")
    args = ap.parse_args()
    table = compare(*args.sweeps, standard=args.standard)
    if args.undecided:
        print(",".join(undecided_arms(table)))
        return
    print(table.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    if table.seed.nunique() > 1:
        print()
        print(summarise(table).to_string(index=False, float_format=lambda v: f"{v:+.3f}"))


if __name__ == "__main__":
    main()
