"""What a run prints: one line per epoch where no progress bar can be drawn, no third-party
chatter, and a plain statement of how far training got (``convergence``).

A terminal gets Lightning's live progress bars. Anything else (CI, ``| tee``, a cluster's log
file) gets one log line per epoch instead: a progress bar redrawn into a file leaves carriage
returns and cursor-up sequences (``ESC[A``) behind.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lipvae.results import atomic_write_text

log = logging.getLogger("lipvae")

#: Warnings from the libraries lipvae drives that say nothing a lipvae user can act on.
_QUIET = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning on newer torch
    r".*does not have many workers.*",  # lipvae's batches are in-memory tensors
    r"`\.fit\(ckpt_path=.*",  # Lightning's notes on resuming; lipvae logs its own
    r"\.fit\(ckpt_path=.*",
    r".*is set, but there is no last checkpoint available.*",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_third_party() -> None:
    """Silence the third-party warnings and adverts listed above (errors and lipvae's own
    warnings still show). Idempotent."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def interactive(stream=None) -> bool:
    """Whether progress bars can be drawn: the stream (stderr, where tqdm writes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class EpochHistory(Callback):
    """Records the validation loss of every epoch (kept in checkpoints, so a resumed run has the
    whole curve) and, with ``echo``, logs one line per epoch: where no progress bar is drawn,
    it is what a user watches."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.val_losses: list[float] = []
        self._start = time.monotonic()

    def state_dict(self) -> dict:
        return {"val_losses": list(self.val_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.val_losses = [float(v) for v in state.get("val_losses", [])]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val/loss"])
        self.val_losses.append(loss)
        if not self.echo:
            return
        best = min(self.val_losses)
        train = trainer.callback_metrics.get("train/loss_epoch")
        train_text = "" if train is None else f"train loss {float(train):.2f}, "
        log.info("epoch %d/%d: %sval loss %.2f (best %.2f at epoch %d), %d steps, %.0f s",
                 len(self.val_losses), trainer.max_epochs, train_text, loss, best,
                 self.val_losses.index(best) + 1, trainer.global_step, time.monotonic() - self._start)


def time_is_up(trainer: L.Trainer) -> bool:
    """Whether Lightning's Timer (``trainer.max_time``) has ended training."""
    return any(isinstance(c, Timer) and (left := c.time_remaining("train")) is not None and left <= 0
               for c in trainer.callbacks)


WINDOW = 3  # epochs over which the last improvement is measured


def convergence(val_losses: list[float], stop_reason: str, evaluated_epoch: int) -> dict:
    """How far from converged training was when it stopped, from the validation curve.

    ``converged`` is true only when early stopping (or the fine-tune phase's own rule) ended
    training; ``improvement_last_epoch`` and ``improvement_last_3_epochs`` are how much the
    validation loss fell (nats per image, positive: still improving) over the last epochs,
    ``best_epoch_is_last`` whether the evaluated epoch was the last one."""
    losses = [v for v in val_losses if math.isfinite(v)]
    converged = stop_reason in ("patience", "finetune_converged")

    def fall(k: int) -> float | None:
        return None if len(losses) <= k else losses[-k - 1] - losses[-1]

    return {
        "converged": converged,
        "val_losses": [round(v, 4) for v in losses],
        "improvement_last_epoch": fall(1),
        f"improvement_last_{WINDOW}_epochs": fall(WINDOW),
        "best_epoch_is_last": bool(losses) and evaluated_epoch >= len(losses),
    }


def describe(conv: dict, stop_reason: str, epochs: int) -> str:
    """One sentence for the log: why training stopped and whether it had converged."""
    why = {
        "patience": "early stopping (no better validation loss for callbacks.early_stopping.patience epochs)",
        "max_epochs": f"trainer.max_epochs ({epochs} epochs)",
        "max_time": "trainer.max_time (the wall-clock budget)",
        "finetune_converged": "the fine-tune phase converging",
        "finetune_max_epochs": "the fine-tune phase's epoch limit",
    }.get(stop_reason, stop_reason)
    if conv["converged"]:
        return f"training stopped by {why} after {epochs} epochs: converged"
    last = conv["improvement_last_epoch"]
    window = conv[f"improvement_last_{WINDOW}_epochs"]
    moved = "" if last is None else f"; the validation loss still fell {last:.2f} nats in the last epoch"
    if window is not None:
        moved += f" ({window:.2f} over the last {WINDOW})"
    hint = ("a longer budget (trainer.max_epochs, trainer.max_time) would train it further"
            if last is None or last > 0 else "it was levelling off")
    return f"training stopped by {why} after {epochs} epochs: NOT converged{moved}; {hint}"


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

