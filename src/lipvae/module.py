"""Lightning glue: ELBO training with Adam, and the fine-tune phase of the paper's schedule.

Lipschitz models train with few Björck iterations, then fine-tune with many more at a
lower learning rate until the epoch's training loss changes by at most ``tol`` nats for
``patience`` epochs (docs/reproduction.md), and are frozen afterwards (``VAE.freeze``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from lipvae.logs import time_is_up
from lipvae.networks import project_bjorck_, set_bjorck
from lipvae.results import RunFolder
from lipvae.vae import VAE


class NonFiniteLossError(RuntimeError):
    pass


class VAEModule(L.LightningModule):
    """Trains ``vae`` on the negative ELBO with Adam at ``lr`` (``StiefelAdam`` when it holds
    Stiefel weights); tests its ELBO and, with ``num_importance`` samples per image (0: not),
    its log-likelihood. After each step, Björck layers with ``project_iters`` project their
    weights; Stiefel weights are retracted every ``retract_every`` steps, from gradients projected
    onto the tangent space if ``tangent_projection`` (``StiefelAdam``), and always before a
    validation and the end of training (the ``module`` config group)."""

    def __init__(self, vae: VAE, lr: float = 1e-4, num_importance: int = 50, retract_every: int = 1,
                 tangent_projection: bool = True) -> None:
        super().__init__()
        self.vae, self.lr, self.num_importance = vae, lr, num_importance
        self.retract_every, self.tangent_projection = retract_every, tangent_projection

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        project_bjorck_(self.vae)  # each Björck layer with its own project_iters (none: nothing)
        if batch_idx + 1 >= self.trainer.num_training_batches:  # an epoch's end: checkpoints follow
            self.retract()

    def retract(self) -> None:
        """Stiefel weights exactly back on the manifold (nothing without them). Called in the
        trainer's hooks only, where ``self.trainer`` is attached."""
        for opt in self.trainer.optimizers:
            if isinstance(opt, StiefelAdam):
                opt.retract()

    # The weights anything looks at are orthonormal, whatever retract_every: the last step of an
    # epoch and every validation retract first, and the best and last checkpoints are saved at
    # an epoch's end. (A checkpoint taken mid-epoch on a stop keeps the weights as they are, so
    # that a resume goes on exactly as the stopped run would have; it is only ever resumed.)
    def on_validation_epoch_start(self) -> None:
        self.retract()

    def on_train_end(self) -> None:
        self.retract()

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
                f" likely causes: module.lr={self.lr:g} too high, extreme enc_L, dec_L, model.beta or"
                " model.encoder_std.gamma, or bad data; lower module.lr (a resume may change it)"
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
        return make_optimizer(self.parameters(), self.lr, retract_every=self.retract_every,
                              tangent_projection=self.tangent_projection)


def make_optimizer(params, lr: float, **stiefel) -> torch.optim.Optimizer:
    """Adam; ``StiefelAdam`` (given ``stiefel``'s settings) when some weight lives on the Stiefel
    manifold (``StiefelLinear``)."""
    params = list(params)
    if any(_on_stiefel(p) for p in params):
        return StiefelAdam(params, lr=lr, **stiefel)
    return torch.optim.Adam(params, lr=lr)


def _on_stiefel(p: torch.Tensor) -> bool:
    """Whether ``p`` is a geoopt weight on a Stiefel manifold (geoopt, slow to import, is looked
    up only if something imported it: without it no such weight exists)."""
    geoopt = sys.modules.get("geoopt")
    return geoopt is not None and isinstance(getattr(p, "manifold", None), geoopt.Stiefel)


class StiefelAdam(torch.optim.Adam):
    """Adam with its weights on the Stiefel manifold kept there: Adam takes its step with
    per-element moments and the result is retracted onto the manifold by QR (geoopt's ``retr``,
    computed by ``qr_retract``). Other parameters take Adam's steps unchanged.

    Two settings trade exactness *during* training for speed (docs/performance.md, "Speed IV"):
    ``tangent_projection`` projects each gradient onto the tangent space at the weight first
    (geoopt's ``egrad2rgrad``: two n×p×p products per weight); ``retract_every`` = k retracts after
    every k-th step only, so that between retractions the weights drift off the manifold by at
    most k Adam steps. Whatever k, ``retract()`` puts every weight back exactly, and ``VAEModule``
    calls it before every validation and at the end of training: the weights that are evaluated,
    saved as best or last, frozen and certified are always orthonormal (to float precision).

    Not geoopt's ``RiemannianAdam``: that one keeps *one* second moment per matrix (the manifold's
    inner product), so each step moves a whole n×p weight by about ``lr`` in Frobenius norm, where
    Adam moves every element by about ``lr``: √(np) times smaller (about 600× for 784×512). At the
    ELBO's learning rates it barely learned: 36 steps on MNIST (widths 64-64, lr 1e-3) took the
    training loss from 40 to 5.4 nats with it, to −548 with the Björck layer and to −550 with
    this. The momentum is not transported between tangent spaces: the weights move little per
    step, and each new gradient is projected at the new point.
    """

    def __init__(self, params, lr: float = 1e-3, tangent_projection: bool = True, retract_every: int = 1,
                 **adam) -> None:
        if int(retract_every) < 1:
            raise ValueError(f"retract_every must be an integer >= 1, got {retract_every}")
        super().__init__(params, lr=lr, **adam)
        self.tangent_projection, self.retract_every = bool(tangent_projection), int(retract_every)

    def _manifold(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if _on_stiefel(p)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning passes the forward-backward as a closure
            with torch.enable_grad():
                loss = closure()
        manifold = self._manifold()
        if self.tangent_projection:
            for p in manifold:
                if p.grad is not None:
                    p.grad.copy_(p.manifold.egrad2rgrad(p, p.grad))
        super().step()
        if self._steps() % self.retract_every == 0:
            self.retract()
        return loss

    def _steps(self) -> int:
        """Adam's own step count (saved in its state, so a resumed run retracts where the
        uninterrupted one did)."""
        manifold = self._manifold()
        return int(self.state[manifold[0]]["step"]) if manifold and manifold[0] in self.state else 0

    @torch.no_grad()
    def retract(self) -> None:
        """Every manifold weight back onto the manifold (the Q factor of the weight), unless it
        is already there: retracted at this step count, or untrained. A retraction of weights on
        the manifold would change them by float rounding, so a run that asked for one more (a
        resumed one) would drift from one that did not. The step count of the last retraction is
        kept in the first parameter group (saved with the optimiser's state)."""
        steps, group = self._steps(), self.param_groups[0]
        if steps == group.get("retracted_at", 0):
            return
        for p in self._manifold():
            p.copy_(qr_retract(p.detach()))
        group["retracted_at"] = steps


def qr_retract(w: torch.Tensor) -> torch.Tensor:
    """The Q factor (positive diagonal R) of a tall ``w`` near the Stiefel manifold, i.e. geoopt's
    QR retraction ``EuclideanStiefel.retr``, computed as ``w R⁻¹`` with ``Rᵀ R = wᵀw`` (Cholesky
    QR): the same matrix, from a Gram product, a p×p Cholesky and a triangular solve, 1.4–1.6
    times faster on a CPU than Householder QR at 784×512 and 512×512. Cholesky QR loses
    orthogonality as cond(w)², harmless here (an Adam step from an orthonormal matrix leaves
    cond ≈ 1); where the Cholesky fails, or on Apple's MPS, geoopt's QR does it."""
    if w.device.type != "mps":
        gram = w.mT @ w
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        # near the manifold (‖wᵀw − I‖_F < ½, so cond(w)² < 3) one Cholesky QR is exact to float
        # precision; farther (a huge learning rate's step) Householder QR below is, at any cond
        if bool(torch.linalg.matrix_norm(gram - eye) < 0.5):
            r, info = torch.linalg.cholesky_ex(gram, upper=True)
            if int(info) == 0:
                return torch.linalg.solve_triangular(r, w, upper=True, left=False)
    import geoopt

    point = w.cpu() if w.device.type == "mps" else w  # MPS has no QR
    return geoopt.EuclideanStiefel().retr(point, torch.zeros_like(point)).to(w.device)


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
        if time_is_up(trainer):  # trainer.max_time ends training in either phase
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
        pl_module.log("phase", {"train": 0.0, "finetune": 1.0, "done": 2.0}[self.phase], on_epoch=True)
