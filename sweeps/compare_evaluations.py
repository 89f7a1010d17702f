"""A run's own estimated margins beside those of its re-evaluations with other attack settings.

For every run below the folders: the mean estimated margin its training run recorded (with
that run's attack settings), and for each evaluation under its ``evaluations/`` the mean with
the re-evaluation's overrides, the paired difference over the same inputs (re-evaluation minus
the run's; negative: the re-evaluation's attack found smaller margins, so it is the stronger)
and on how many inputs it found a smaller margin.

    python -m lipvae.evaluate <run> attack.warm_steps=40          # once per run
    python sweeps/compare_evaluations.py <folder> [<folder> ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def _margins(folder: Path, record: dict) -> pd.Series | None:
    table = (record.get("estimated") or {}).get("table")
    if not table or not (folder / table).is_file():
        return None
    return pd.read_csv(folder / table).set_index("index")["estimated"]


def compare(*folders: Path) -> pd.DataFrame:
    rows = []
    for folder in folders:
        for results in sorted(Path(folder).rglob("results.json")):
            run = results.parent
            if "evaluations" in run.parts:
                continue
            try:
                r = json.loads(results.read_text())
            except ValueError:
                continue
            own = _margins(run, r) if r.get("status") == "completed" else None
            if own is None:
                continue
            for ev_file in sorted(run.glob("evaluations/*/evaluation.json")):
                ev = json.loads(ev_file.read_text())
                other = _margins(ev_file.parent, ev)
                if other is None or ev.get("reused_estimated_margins"):
                    continue
                common = own.index.intersection(other.index)
                diff = other[common] - own[common]
                rows.append({
                    "run": run.name, "kind": r["model"]["kind"], "L": (r.get("config") or {}).get("enc_L"),
                    "seed": (r.get("config") or {}).get("seed"), "overrides": " ".join(ev.get("overrides") or []),
                    "run_mean": float(own[common].mean()), "evaluation_mean": float(other[common].mean()),
                    "difference": float(diff.mean()), "relative": float(diff.mean() / own[common].mean()),
                    "smaller_on": int((diff < 0).sum()), "inputs": len(common),
                })
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+")
    table = compare(*ap.parse_args().folders)
    print(table.to_string(index=False, float_format=lambda v: f"{v:+.4f}") if len(table) else "no re-evaluations found")


if __name__ == "__main__":
    main()
