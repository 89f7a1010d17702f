"""Paired comparison of estimated margins against the standard VAE, seed by seed, from the run
folders below the given ones (the statistics: ``lipvae.paired``; 10,000 bootstrap resamples of
the inputs, seed 0). ``lipvae.report`` shows the same tables for the runs it reports on.

    python sweeps/paired_margins.py <folder> [<folder> ...] [--standard <folder>]

Runs are found anywhere below the folders. ``--standard`` takes the standard VAEs from that
folder alone (when the folders hold more than one per seed). A Lipschitz run pairs only with a
standard VAE whose margins were measured on the same inputs (the same data, read identically,
and the same attack r and p).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from lipvae.paired import Arm, differences, measured_on, summarise, undecided_arms, unpaired_seeds


def load(run: Path) -> tuple[dict, pd.DataFrame] | None:
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
    return r, pd.read_csv(run / table).set_index("index")


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
    def arm(run, r, m, kind, L):
        return Arm.of_table(run.name, kind, L, _seed(r), m, measured_on(r.get("data"), r.get("estimated")))

    arms = [arm(run, r, m, r["model"]["kind"], (r.get("config") or {}).get("enc_L"))
            for run, (r, m) in runs.items() if r["model"]["kind"] != "standard"]
    arms += [arm(run, r, m, "standard", None) for run, (r, m) in pool.items() if r["model"]["kind"] == "standard"]
    if unpaired_seeds(arms):
        where = standard if standard is not None else ", ".join(map(str, sweeps))
        for lip in (a for a in arms if a.kind == "lipschitz"):
            found = sum(a.kind == "standard" and (a.seed, a.inputs) == (lip.seed, lip.inputs) for a in arms)
            if found != 1:
                raise SystemExit(f"error: {where}: found {found} completed standard VAE runs with seed {lip.seed}"
                                 f" measured on the same inputs (data and attack r, p) as {lip.name}; need exactly"
                                 " one (choose with --standard)")
    return differences(arms, resamples=resamples, seed=seed)


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
