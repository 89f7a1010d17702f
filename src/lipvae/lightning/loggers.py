"""``csv/metrics.csv``: Lightning's CSV log, appended to across resumes and replaced atomically."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lipvae.results import atomic_write_text


def write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """A metrics CSV replaced atomically (a signal never leaves it cut short)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


class AppendingCSVLogger(Logger):
    """``csv/metrics.csv`` of a run: one row per logging step, as Lightning's CSVLogger writes it
    (the metrics of a step and its ``step``; the columns in order of first appearance), except
    that a resumed run appends to the file instead of deleting it, so the curves from before a
    stop are kept, and every save replaces the file atomically (a signal never leaves it cut
    short). Built on Lightning's public ``Logger`` interface alone."""

    NAME_METRICS_FILE = "metrics.csv"

    def __init__(self, save_dir: str | Path = ".", name: str = "csv", version: str | int = "",
                 flush_logs_every_n_steps: int = 100) -> None:
        super().__init__()
        self._save_dir, self._name, self._version = str(save_dir), name, version
        self._every = int(flush_logs_every_n_steps)
        self._rows: list[dict] | None = None  # the file's rows, read at the first save
        self._keys: list[str] = []
        self._pending: list[dict] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str | int:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def log_dir(self) -> str:
        version = self._version if isinstance(self._version, str) else f"version_{self._version}"
        return os.path.join(self.root_dir, version) if version else self.root_dir

    @property
    def metrics_file_path(self) -> str:
        return os.path.join(self.log_dir, self.NAME_METRICS_FILE)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Nothing: the run's config is in .hydra/ and results.json."""

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        row = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        row["step"] = len(self._pending) if step is None else step
        self._pending.append(row)
        if (row["step"] + 1) % self._every == 0:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._pending:
            return
        if self._rows is None:  # a resumed run's earlier rows (train.py has dropped the killed epoch's)
            self._rows, self._keys = _read_rows(Path(self.metrics_file_path))
        for row in self._pending:
            self._keys += [k for k in row if k not in self._keys]
        self._rows += self._pending
        self._pending = []
        os.makedirs(self.log_dir, exist_ok=True)
        write_rows(Path(self.metrics_file_path), self._keys, self._rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows and columns of a metrics CSV (none when there is no file)."""
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])
