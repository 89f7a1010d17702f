"""What the whole paper (``sweeps/paper.sh``) cost, per stage: the wall time each stage's call
took (its ``== <stage>: N s wall`` lines in the sweep's log, one per call: a stopped and resumed
stage has several) and, from the runs' own records, what the models would take on idle cores.

    python sweeps/paper_time.py outputs/paper [--log outputs/paper/paper.log]

Per model, the idle-core estimate is its epochs times its fastest tenth of epoch times (each
epoch's seconds from its train.log: on a machine shared with other work the slow epochs are the
shared ones) plus its testing, certification and attack seconds (results.json ``timings``).
Summed over models it is core time; half of it is the 2-core wall time with both cores always
busy (two runs at a time). An estimate, not a measurement: process start-up, data loading and a
last model running alone are left out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EPOCH = re.compile(r"epoch \d+/\d+: .*, (\d+(?:\.\d+)?) s$", re.M)
STAGE = re.compile(r"^== (\S+): (\d+) s wall$", re.M)


def idle_seconds(run: Path) -> float | None:
    """The idle-core estimate of one completed run (None when it has no record or no epoch lines)."""
    try:
        record = json.loads((run / "results.json").read_text())
        log = (run / "train.log").read_text()
    except (OSError, ValueError):
        return None
    seconds = sorted(float(s) for s in EPOCH.findall(log))
    if record.get("status") != "completed" or not seconds:
        return None
    timings, epochs = record.get("timings") or {}, (record.get("metrics") or {}).get("epochs")
    evaluation = sum(timings.get(k) or 0.0 for k in ("test_s", "certify_s", "attack_s"))
    return epochs * seconds[len(seconds) // 10] + evaluation


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the sweep's folder (paper.sh's OUT)")
    ap.add_argument("--log", type=Path, help="the sweep's log (its == lines)")
    args = ap.parse_args(argv)
    walls: dict[str, list[int]] = {}
    if args.log:
        for stage, seconds in STAGE.findall(args.log.read_text()):
            walls.setdefault(stage, []).append(int(seconds))
    print("| stage | models | calls' wall time (s) | idle-core estimate (core-hours) |\n|---|---|---|---|")
    total = 0.0
    for stage in sorted(p for p in args.out.iterdir() if p.is_dir() and any(p.glob("*/results.json"))):
        estimates = [e for e in (idle_seconds(run) for run in sorted(stage.iterdir()) if run.is_dir()) if e]
        total += sum(estimates)
        wall = " + ".join(str(s) for s in walls.get(stage.name, [])) or "–"
        print(f"| {stage.name} | {len(estimates)} | {wall} | {sum(estimates) / 3600:.2f} |")
    print(f"\nidle-core estimate: {total / 3600:.2f} core-hours, {total / 7200:.2f} h on 2 cores (two runs at a time)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
