"""Lightning glue: ELBO training with Adam, and the train → fine-tune schedule of the paper.

Lipschitz models train with few Björck iterations, then fine-tune with many more at a
lower learning rate until the epoch's training loss changes by at most ``tol`` nats for
``patience`` epochs (docs/reproduction.md), and are frozen afterwards (``VAE.freeze``).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lipvae.networks import project_bjorck_, set_bjorck
from lipvae.vae import VAE


class NonFiniteLossError(RuntimeError):
    pass


class VAEModule(L.LightningModule):
    def __init__(self, vae: VAE, lr: float = 1e-4, num_importance: int = 50, project_iters: int = 0) -> None:
        super().__init__()
        self.vae, self.lr, self.num_importance = vae, lr, num_importance
        self.project_iters = project_iters

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.project_iters:
            project_bjorck_(self.vae, self.project_iters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(x)

    def _elbo_step(self, batch, stage: str) -> torch.Tensor:
        x = batch[0]
        out = self.vae.elbo(x)
        loss = -out["elbo"].mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(x))
        self.log(f"{stage}/rec", out["rec"].mean(), on_step=False, on_epoch=True, batch_size=len(x))
        self.log(f"{stage}/kl", out["kl"].mean(), on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._elbo_step(batch, "train")
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step};"
                f" likely causes: model.lr={self.lr:g} too high, extreme enc_L, dec_L, model.beta or"
                " model.encoder_std.gamma, or bad data; lower model.lr (a resume may change it)"
            )
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._elbo_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        x = batch[0]
        out = self.vae.elbo(x)
        self.log("test/elbo", out["elbo"].mean(), batch_size=len(x))
        self.log("test/kl", out["kl"].mean(), batch_size=len(x))
        if self.num_importance:
            ll = self.vae.importance_log_likelihood(x, self.num_importance)
            self.log("test/log_likelihood", ll.mean(), batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SaveOnInterrupt(Callback):
    """On SIGINT/SIGTERM or a non-finite loss, save the current state as ``last.ckpt`` so the
    run resumes where it stopped (``resume=true``). A non-finite loss is caught before its
    backward pass, so the weights saved are the last finite ones; that is checked first."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        interrupted = isinstance(exception, (KeyboardInterrupt, NonFiniteLossError)) or (
            type(exception).__name__ == "SIGTERMException"
        )
        if not interrupted or trainer.state.fn != "fit":
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            return
        trainer.save_checkpoint(self.path)


class TrainingSchedule(Callback):
    """Phase 1 (train): early stopping on ``val/loss`` with ``patience`` epochs, at most
    ``max_epochs``. Phase 2 (fine-tune, Lipschitz models only): Björck iterations raised
    to ``finetune_iters`` and the learning rate set to ``finetune_lr``; stops when the
    epoch's training loss moved by at most ``finetune_tol`` nats for ``finetune_patience``
    epochs, or after ``finetune_epochs``. Its state is checkpointed, so runs resume mid-phase.
    """

    def __init__(
        self,
        max_epochs: int,
        patience: int,
        finetune_epochs: int = 0,
        finetune_iters: int = 50,
        finetune_lr: float = 1e-5,
        finetune_tol: float = 1.0,
        finetune_patience: int = 1,
        min_delta: float = 0.0,
    ) -> None:
        self.max_epochs, self.patience, self.min_delta = max_epochs, patience, min_delta
        self.finetune_epochs, self.finetune_iters, self.finetune_lr = finetune_epochs, finetune_iters, finetune_lr
        self.finetune_tol, self.finetune_patience = finetune_tol, finetune_patience
        self.phase = "train"
        self.phase_epochs = 0
        self.best = math.inf
        self.stale = 0
        self.last_train_loss: float | None = None
        # why this schedule ended training: patience, max_epochs, finetune_converged or
        # finetune_max_epochs; None while it runs or when something else stopped it (max_time)
        self.stop_reason: str | None = None

    def state_dict(self) -> dict:
        keys = ("phase", "phase_epochs", "best", "stale", "last_train_loss", "stop_reason")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "finetune":
            self._enter_finetune(trainer, pl_module)

    def _enter_finetune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_bjorck(pl_module, iters=self.finetune_iters)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.finetune_lr

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.phase_epochs += 1
        metrics = trainer.callback_metrics
        if self.phase == "train":
            val = metrics.get("val/loss")
            if val is not None and float(val) < self.best - self.min_delta:
                self.best, self.stale = float(val), 0
            else:
                self.stale += 1
            if self.phase_epochs >= self.max_epochs or self.stale >= self.patience:
                if self.finetune_epochs > 0:
                    self.phase, self.phase_epochs, self.stale = "finetune", 0, 0
                    self.last_train_loss = None
                    self._enter_finetune(trainer, pl_module)
                else:
                    self.stop_reason = "patience" if self.stale >= self.patience else "max_epochs"
                    trainer.should_stop = True
        else:
            loss = float(metrics["train/loss_epoch"])
            if self.last_train_loss is not None and abs(loss - self.last_train_loss) <= self.finetune_tol:
                self.stale += 1
            else:
                self.stale = 0
            self.last_train_loss = loss
            if self.phase_epochs >= self.finetune_epochs or self.stale >= self.finetune_patience:
                converged = self.stale >= self.finetune_patience
                self.stop_reason = "finetune_converged" if converged else "finetune_max_epochs"
                self.phase = "done"
                trainer.should_stop = True
        pl_module.log("phase", {"train": 0.0, "finetune": 1.0, "done": 2.0}[self.phase], on_epoch=True)

    @property
    def total_epochs(self) -> int:
        return self.max_epochs + self.finetune_epochs
