"""The callbacks of a run's training: the epoch log and validation curve (``EpochHistory``),
checkpoints (``RunCheckpoint``, ``SaveOnException``, written by ``AtomicCheckpointIO``), stopping (``KeepStop``, ``StopBetweenSteps``),
the random states kept across a resume (``RandomStates``) and the fine-tune phase (``FineTune``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint, Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lipvae.networks import set_bjorck
from lipvae.results import RunFolder, replace_atomically

log = logging.getLogger("lipvae")


def time_is_up(trainer: L.Trainer) -> bool:
    """Whether Lightning's Timer (``trainer.max_time``) has ended training."""
    return any(isinstance(c, Timer) and (left := c.time_remaining("train")) is not None and left <= 0
               for c in trainer.callbacks)



class EpochHistory(Callback):
    """Records the validation loss and the seconds (training and validation) of every epoch, kept
    in checkpoints, so a resumed run has the whole curve and its whole training time (less the part
    of an epoch before a stop); with ``echo``, logs one line per epoch: where no
    progress bar is drawn, it is what a user watches."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.val_losses: list[float] = []
        self.seconds: list[float] = []
        self._start = time.monotonic()

    def state_dict(self) -> dict:
        return {"val_losses": list(self.val_losses), "seconds": list(self.seconds)}

    def load_state_dict(self, state: dict) -> None:
        self.val_losses = [float(v) for v in state.get("val_losses", [])]
        self.seconds = [float(v) for v in state.get("seconds", [])]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val/loss"])
        self.val_losses.append(loss)
        self.seconds.append(time.monotonic() - self._start)
        if not self.echo or not trainer.is_global_zero:  # on several devices, one line per epoch
            return
        best = min(self.val_losses)
        train = trainer.callback_metrics.get("train/loss_epoch")
        train_text = "" if train is None else f"train loss {float(train):.2f}, "
        log.info("epoch %d/%d: %sval loss %.2f (best %.2f at epoch %d), %d steps, %.0f s",
                 len(self.val_losses), trainer.max_epochs, train_text, loss, best,
                 self.val_losses.index(best) + 1, trainer.global_step, self.seconds[-1])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written beside their name and renamed (``replace_atomically``): a full disk
    or a kill never leaves a truncated ``last.ckpt`` behind (nor the partial file)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # checkpoints/ on the first save
        replace_atomically(Path(path), lambda partial: super(AtomicCheckpointIO, self).save_checkpoint(
            checkpoint, partial, storage_options))


class KeepStop(Callback):
    """Keeps a decision to stop training across a resume. Lightning checkpoints each callback's
    state but not ``trainer.should_stop``, so a run that early stopping, the fine-tune phase or
    the time budget had ended, interrupted after its last checkpoint (while the margins of its
    best model were evaluated), trained on when resumed: one more epoch after early stopping, and
    on to the epoch limit after the fine-tune phase had converged. Listed after the callbacks
    that decide, it notes at each epoch's end whether training stops there (its state is saved
    with the checkpoint written at that end); a resume from there stops before any epoch
    (``trainer.should_stop``), counting the epochs as the stopped run did."""

    def __init__(self) -> None:
        self.stopped_at: int | None = None  # the epochs trained when training stopped

    def state_dict(self) -> dict:
        return {"stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.stopped_at = state.get("stopped_at")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stops = trainer.should_stop or time_is_up(trainer)
        self.stopped_at = trainer.current_epoch + 1 if stops else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_at is not None:  # restored: training had ended, its margins had not been written
            trainer.should_stop = True


class StopBetweenSteps(Callback):
    """A stop (SIGTERM, SIGINT) that arrives during training takes effect between two training
    steps, not inside one: the checkpoint saved on the stop then holds the state after a whole
    step (optimiser update, Björck projection, Stiefel retraction, random streams), and a resume
    from it trains on exactly as the uninterrupted run would have (with the data module's
    ``ResumableOrder``). The process's signal handler asks ``defer``; a second signal, or one
    outside training (the end-of-fit evaluation), stops at once."""

    active = False
    pending: str | None = None

    @classmethod
    def defer(cls, name: str) -> bool:
        """Whether the stop ``name`` waits for the next step boundary (training, first signal)."""
        if cls.active and cls.pending is None:
            cls.pending = name
            return True
        return False

    @classmethod
    def _stop_if_asked(cls) -> None:
        if cls.pending is not None:
            name, cls.pending = cls.pending, None
            raise KeyboardInterrupt(name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        StopBetweenSteps.active, StopBetweenSteps.pending = True, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._stop_if_asked()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        StopBetweenSteps.active = False
        self._stop_if_asked()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        StopBetweenSteps.active, StopBetweenSteps.pending = False, None


class RandomStates(Callback):
    """Keeps the random streams in the checkpoint, so that a resumed run draws what the
    uninterrupted one would have: the global generators of torch (CPU and CUDA: the VAE's latent
    samples), NumPy and Python, saved with each checkpoint and put back when training resumes
    from one. (The training batches' order is the data module's own generator, saved with it.)"""

    def __init__(self) -> None:
        self._restore: dict | None = None

    def state_dict(self) -> dict:
        import random

        import numpy as np

        kind, key, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"kind": kind, "key": torch.from_numpy(key.astype("int64")), "pos": int(pos),
                           "has_gauss": int(has_gauss), "gauss": float(gauss)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._restore = state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restore:
            return
        import random

        import numpy as np

        state, self._restore = self._restore, None
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["key"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))


class SaveOnException(OnExceptionCheckpoint):
    """Lightning's OnExceptionCheckpoint (``last.ckpt`` on SIGINT/SIGTERM, a non-finite loss or
    any other exception, so that ``resume=true`` continues from there), limited to training
    and to finite weights: a non-finite loss is caught before its backward pass, so the state
    saved is the last finite one, and a stop during testing or evaluation (the margin callbacks',
    at the end of fitting, included) keeps the last checkpoint of training."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            return
        if getattr(pl_module, "_evaluating_margins", False):  # training is over: its last checkpoint stays
            return
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Kept: the file is ModelCheckpoint's ``last.ckpt`` too (Lightning's removes its own at
        the end of a run that did not fail)."""


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose remembered files follow the run folder: a checkpoint
    stores the absolute paths of ``best.ckpt`` and ``last.ckpt``, so a run folder copied or
    moved elsewhere and resumed would evaluate (and compare against) the *original* folder's
    best weights. On loading, every path that was inside the saving run's checkpoint folder is
    re-rooted in this run's own, and the scores are kept. Without a ``dirpath`` the files go to
    ``checkpoints/`` in the trainer's ``default_root_dir`` (the run folder), not into a logger's.

    A run has two (``callbacks.model_checkpoint`` and ``callbacks.last_checkpoint``): ``best.ckpt``
    (the lowest ``val/loss``) and ``last.ckpt`` (``monitor=None``: the state at the end of every
    epoch, where Lightning's ``save_last`` since 2.6 writes it only in an epoch that also writes
    a best checkpoint). Listed after the best one, the last one's file holds its updated state."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(RunFolder(trainer.default_root_dir).checkpoints)
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and Path(saved) != Path(self.dirpath):
            def here(path):
                if not path or Path(path).parent != Path(saved):
                    return path
                return str(Path(self.dirpath) / Path(path).name)

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": here(state_dict.get("best_model_path")),
                "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                "last_model_path": here(state_dict.get("last_model_path")),
                "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)


class FineTune(Callback):
    """Phase 2 of the paper's schedule, for Lipschitz models (phase 1 is Lightning's
    EarlyStopping on ``val/loss``). When phase 1 ends (early stopping, or after ``train_epochs``
    epochs) it raises the Björck iterations to ``bjorck_iters`` and sets the learning rate to
    ``lr``, and training goes on until the epoch's training loss moved by at most ``tol`` nats for
    ``patience`` epochs in a row, or for ``max_epochs`` epochs. The Trainer's ``max_epochs`` is
    the whole schedule's (a run gives it ``trainer.max_epochs`` + ``max_epochs``); without
    ``train_epochs`` phase 1 may take all but the last ``max_epochs`` of it. EarlyStopping
    decides when validation ends; this callback acts later, at the epoch's end, so from phase 2
    on its decision replaces early stopping's. Its state is checkpointed, so a run resumes
    mid-phase. With ``max_epochs=0``, or on a standard VAE, it does nothing (``active``)."""

    def __init__(self, max_epochs: int = 0, bjorck_iters: int = 50, lr: float = 1e-5, tol: float = 1.0,
                 patience: int = 1, train_epochs: int | None = None) -> None:
        self.train_epochs, self.max_epochs, self.bjorck_iters = train_epochs, max_epochs, bjorck_iters
        self.lr, self.tol, self.patience = lr, tol, patience
        self.active = max_epochs > 0
        self.phase = "train"
        self.phase_epochs = 0
        self.stale = 0
        self.last_train_loss: float | None = None
        self.stop_reason: str | None = None  # finetune_converged or finetune_max_epochs, once done

    def state_dict(self) -> dict:
        keys = ("phase", "phase_epochs", "stale", "last_train_loss", "stop_reason")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    def epochs_for(self, vae) -> int:
        """The epochs phase 2 adds for this VAE (0: it does not run, as on a standard VAE)."""
        return self.max_epochs if self.max_epochs > 0 and getattr(vae, "kind", "lipschitz") == "lipschitz" else 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = self.epochs_for(getattr(pl_module, "vae", None)) > 0
        if not self.active:
            return
        if self.train_epochs is None and trainer.max_epochs is not None and trainer.max_epochs >= 0:
            self.train_epochs = max(trainer.max_epochs - self.max_epochs, 1)  # phase 2's epochs kept for it
        if self.phase == "finetune":
            self._enter(trainer, pl_module)

    def _phase1_limit(self) -> int | None:
        """Phase 1's epochs (None: no limit, a Trainer's max_epochs of -1 or None)."""
        return self.train_epochs if self.train_epochs is not None and self.train_epochs >= 0 else None

    def _enter(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_bjorck(pl_module, iters=self.bjorck_iters)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.lr

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self.phase_epochs += 1
        # trainer.max_time ends training in either phase; rank zero's clock decides for every device
        if trainer.strategy.broadcast(time_is_up(trainer)):
            return
        if self.phase == "train":
            early = any(c.stopping_reason != EarlyStoppingReason.NOT_STOPPED for c in trainer.early_stopping_callbacks)
            limit = self._phase1_limit()
            if early or (limit is not None and self.phase_epochs >= limit):
                self.phase, self.phase_epochs = "finetune", 0
                self._enter(trainer, pl_module)
                trainer.should_stop = False
        elif self.phase == "finetune":
            loss = float(trainer.callback_metrics["train/loss_epoch"])
            moved = self.last_train_loss is None or abs(loss - self.last_train_loss) > self.tol
            self.stale = 0 if moved else self.stale + 1
            self.last_train_loss = loss
            if self.stale >= self.patience or self.phase_epochs >= self.max_epochs:
                self.stop_reason = "finetune_converged" if self.stale >= self.patience else "finetune_max_epochs"
                self.phase = "done"
            trainer.should_stop = self.phase == "done"  # early stopping has no say in this phase
        pl_module.log("phase", {"train": 0.0, "finetune": 1.0, "done": 2.0}[self.phase], on_epoch=True, sync_dist=True)
