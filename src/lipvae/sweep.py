"""Hydra callback: at the end of a multirun, the sweep's report, one line per failed or refused
job and a non-zero exit."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lipvae.results import ResultsError, RunFolder
from lipvae.schema import check

log = logging.getLogger("lipvae")

#: Where a sweep's jobs note that they refused to run (in the sweep's folder, not the job's: a
#: refused job leaves its own folder as it was). Cleared when a multirun starts.
REFUSED = ".refused"


def note_refusal(run_dir: Path, message: str) -> None:
    """Record that the job of ``run_dir`` (a folder of a sweep) refused to run, and why."""
    from lipvae.results import atomic_write_text

    folder = Path(run_dir).parent / REFUSED
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / Path(run_dir).name, message.splitlines()[0] + "\n")


def refusals(sweep_dir: Path) -> dict[str, str]:
    folder = Path(sweep_dir) / REFUSED
    if not folder.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in sorted(folder.iterdir()) if p.is_file()}


def job_statuses(sweep_dir: Path) -> dict[str, str]:
    """``{job folder: status}`` for every job folder of a sweep (``missing`` without results)."""
    out = {}
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and RunFolder(p).hydra.is_dir()):
        try:
            results = RunFolder(job).results()
        except ResultsError:
            out[job.name] = "missing (no readable results.json)"
            continue
        out[job.name] = results.status + (f": {results.error or ''}" if results.status == "failed" else "")
    return out


MULTIRUN_FILE = "multirun.yaml"
KEPT_FILE = ".multirun.first.yaml"  # the first sweep's record while a later multirun runs


def _keep_first_record(sweep: Path) -> None:
    """Put the first sweep's ``multirun.yaml`` back (set aside when a later multirun started),
    the later one's as ``multirun-<time>.yaml`` beside it."""
    import time

    kept, record = sweep / KEPT_FILE, sweep / MULTIRUN_FILE
    if not kept.is_file():
        return
    if record.is_file() and record.read_bytes() != kept.read_bytes():
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        while (sweep / f"multirun-{stamp}{f'-{n}' if n else ''}.yaml").exists():
            n += 1
        record.replace(sweep / f"multirun-{stamp}{f'-{n}' if n else ''}.yaml")
    kept.replace(record)


class SweepSummary(Callback):
    """Ends a multirun with its report (``report``: ``lipvae.report`` on the sweep folder, as
    ``python -m lipvae.report <sweep>`` writes it, when a job completed) and one line per job
    that failed or was refused, and keeps the sweep folder's ``multirun.yaml`` (Hydra's record
    of the sweep's command) that of the sweep that made the folder: a later multirun into it (a
    ``resume=auto`` re-run, or one with other overrides) leaves its own as
    ``multirun-<time>.yaml`` beside it."""

    def __init__(self, report: bool = True) -> None:
        check(isinstance(report, bool), "hydra.callbacks.sweep_summary.report", report, "true, false")
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        shutil.rmtree(sweep / REFUSED, ignore_errors=True)
        _keep_first_record(sweep)  # a multirun killed before its end left its record in the way
        record = sweep / MULTIRUN_FILE
        if record.is_file() and not record.is_symlink():  # Hydra is about to overwrite it
            record.replace(sweep / KEPT_FILE)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        _keep_first_record(sweep)
        statuses = job_statuses(sweep)
        for job, why in refusals(sweep).items():
            statuses[job] = f"refused by this multirun: {why}"
        failed = {k: v for k, v in statuses.items() if v != "completed"}
        log.info("sweep %s: %d of %d jobs completed", sweep, len(statuses) - len(failed), len(statuses))
        if self.report and len(failed) < len(statuses):
            _write_report(sweep)
        for job, status in failed.items():
            log.error("job %s %s", job, status)
        if failed:
            print(f"error: {len(failed)} of {len(statuses)} jobs failed or were refused (listed above)", file=sys.stderr)
            sys.exit(1)


def _write_report(sweep: Path) -> None:
    """The sweep's report; one warning line (and the command that writes it) where it cannot be
    written, since the runs themselves are done and recorded."""
    from lipvae.report import build_report

    try:
        path = build_report([sweep])
    except Exception as e:  # noqa: BLE001 (a report is derived from the runs: it never fails the sweep)
        log.warning("no sweep report (%s); write it with: python -m lipvae.report %s",
                    str(e).splitlines()[0] if str(e) else type(e).__name__, sweep)
        return
    log.info("sweep report: %s (and report.html, results.csv, figures beside it)", path)
