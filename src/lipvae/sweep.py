"""Hydra callback: at the end of a multirun, one line per failed job and a non-zero exit."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("lipvae")


def job_statuses(sweep_dir: Path) -> dict[str, str]:
    """``{job folder: status}`` for every job folder of a sweep (``missing`` without results)."""
    out = {}
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        try:
            results = json.loads((job / "results.json").read_text())
            out[job.name] = results.get("status", "unknown")
            if out[job.name] == "failed":
                out[job.name] += f": {results.get('error', '')}"
        except (OSError, ValueError):
            out[job.name] = "missing (no readable results.json)"
    return out


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        statuses = job_statuses(Path(config.hydra.sweep.dir))
        failed = {k: v for k, v in statuses.items() if v != "completed"}
        log.info("sweep %s: %d of %d jobs completed", config.hydra.sweep.dir, len(statuses) - len(failed), len(statuses))
        for job, status in failed.items():
            log.error("job %s %s", job, status)
        if failed:
            print(f"error: {len(failed)} of {len(statuses)} jobs failed (listed above)", file=sys.stderr)
            sys.exit(1)
