"""Sweeps on one machine: how many models per hour a multirun finishes for each way of sharing the
cores between jobs (``hydra.launcher.n_jobs``) and threads per job (``OMP_NUM_THREADS``, which
torch follows), on the joblib launcher.

Each setting runs the same real multirun end to end (process start, data, training, testing,
certification, attack): ``--models`` Lipschitz models of the default experiment over enc_L,
shortened to one epoch on the first ``--limit`` images of each MNIST file. The ratio is against
one job with every core's threads, the launcher's behaviour without ``n_jobs``.

    python benchmarks/bench_sweep.py [--models 4] [--limit 6400] [--settings 1x2 2x1 1x1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import cores, machine


def run_sweep(jobs: int, threads: int, models: int, limit: int, folder: Path) -> float:
    """Wall seconds of one multirun of ``models`` models, ``jobs`` at a time, ``threads`` each."""
    grid = ",".join(str(5 + k) for k in range(models))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "lipvae.train", f"enc_L={grid}", "trainer.max_epochs=1", "trainer.max_time=null",
           f"data.limit={limit}", "logger=csv", "trainer.enable_progress_bar=false",
           "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={folder}", "-m"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep {jobs}x{threads} failed:\n{proc.stderr[-3000:]}")
    done = len(list(folder.glob("*/results.json")))
    if done != models:
        raise SystemExit(f"sweep {jobs}x{threads}: {done} of {models} results written")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--limit", type=int, default=6400, help="images kept from each MNIST file")
    ap.add_argument("--settings", nargs="+", default=[f"1x{cores()}", f"{cores()}x1", "1x1"],
                    help="jobs x threads per job")
    args = ap.parse_args()
    print(machine())
    print(f"{args.models} models per multirun (default experiment, 1 epoch, data.limit={args.limit})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            jobs, threads = (int(v) for v in setting.split("x"))
            wall = run_sweep(jobs, threads, args.models, args.limit, Path(tmp) / setting)
            rows.append((setting, wall, args.models * 3600 / wall))
            print(f"{jobs} job(s) x {threads} thread(s): {wall:.1f} s, {rows[-1][2]:.1f} models/hour", flush=True)
    base = rows[0][2]
    print(f"\n| jobs × threads | wall (s) | models per hour | vs {rows[0][0]} |\n|---|---|---|---|")
    for setting, wall, rate in rows:
        print(f"| {setting} | {wall:.1f} | {rate:.1f} | {rate / base:.2f}× |")


if __name__ == "__main__":
    main()
