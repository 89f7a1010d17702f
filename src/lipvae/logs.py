"""What a run prints: one line per epoch where no progress bar can be drawn, no third-party
chatter, and a plain statement of how far training got (``convergence``).

A terminal gets Lightning's live progress bars. Anything else (CI, ``| tee``, a cluster's log
file) gets one log line per epoch instead: a progress bar redrawn into a file leaves carriage
returns and cursor-up sequences (``ESC[A``) behind.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings

log = logging.getLogger("lipvae")

#: Warnings from the libraries lipvae drives that say nothing a lipvae user can act on.
_QUIET = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning on newer torch
    r".*does not have many workers.*",  # lipvae's batches are in-memory tensors
    r"`\.fit\(ckpt_path=.*",  # Lightning's notes on resuming; lipvae logs its own
    r"\.fit\(ckpt_path=.*",
    r".*is set, but there is no last checkpoint available.*",
    r"Checkpoint directory .* exists and is not empty",  # a resumed run's own checkpoints
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
