"""A training run as a function of objects: ``train(cfg, RunContext(folder))`` checks a composed
config and runs it (``run``): build → fit → freeze → evaluate (in memory) → test → record, one
named function each. No Hydra, no exit codes: ``lipvae.train`` is the command around it."""

from __future__ import annotations

import csv
import inspect
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lipvae.certify.certificates import check_lipschitz
from lipvae.stored import input_shape_of, load_best_weights, load_checkpoint, load_state
from lipvae.build import build_datamodule, build_entries, build_module, build_trainer, build_vae
from lipvae.config import validate
from lipvae.data import check_datamodule
from lipvae.errors import UserError
from lipvae.evaluation import Evaluation, check_radii, evaluate, test_split
from lipvae.logs import convergence, describe, interactive
from lipvae.lightning.callbacks import (AtomicCheckpointIO, EpochHistory, FineTune, KeepStop, RandomStates,
                                       SaveOnException, StopBetweenSteps, time_is_up)
from lipvae.lightning.loggers import write_rows
from lipvae.lightning.module import VAEModule
from lipvae.networks import orthonormality_error
from lipvae.plots import is_wandb, log_image, save_aggregate_posterior, save_prior_samples, save_reconstructions
from lipvae.results import Results, RunFolder, code_version, replace_atomically, torch_save


log = logging.getLogger("lipvae")


@dataclass
class RunContext:
    """What a run needs beyond its config: its folder, and how it was started (recorded in
    results.json, and used for the hint that resumes it). ``RunContext(run_dir)`` is a run
    started from Python; ``from_hydra()`` one started by ``python -m lipvae.train``."""

    run_dir: Path
    command: str = ""
    overrides: list[str] = field(default_factory=list)
    experiment: str | None = None  # the figure preset (experiment group), or None
    tier: str | None = None  # the tier group's choice (laptop, official, ...)
    multirun: bool = False
    group: str | None = None  # the W&B group shared by the runs of one multirun
    resumed_from: dict | None = None  # the checkpoint a resumed run continued from (epoch, step)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.command = self.command or " ".join([_program(), *sys.argv[1:]])

    @classmethod
    def from_hydra(cls) -> RunContext:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        parts = Path(hc.sweep.dir).parts
        return cls(run_dir=Path(hc.runtime.output_dir), overrides=list(hc.overrides.task),
                   experiment=hc.runtime.choices.get("experiment"), tier=hc.runtime.choices.get("tier"),
                   multirun=multirun,
                   group=("_".join(parts[-3:]) if len(parts) >= 3 else "_".join(parts)) if multirun else None)

    def resume_hint(self) -> str:
        """How to continue this run. A sweep job is resumed alone, in run mode, in its own folder;
        a run stopped before its first checkpoint has nothing to resume and starts afresh."""
        folder = shlex.quote(f"hydra.run.dir={self.run_dir}")
        how = "resume=true" if RunFolder(self.run_dir).last_checkpoint.is_file() else "resume=auto"
        if not self.multirun:
            if how == "resume=auto":
                return f"no checkpoint was written yet: run the same command plus {folder} resume=auto to start it again"
            return f"resume with the same command plus {folder} resume=true"
        overrides = " ".join(shlex.quote(o) for o in self.overrides if not o.startswith("resume="))
        return f"resume this job alone with: {_program()} {overrides} {folder} {how}"

    def record(self, loggers) -> dict:
        """results.json's ``run``: what a reader needs to redo the run."""
        wandb_ids = [lg.experiment.id for lg in loggers if is_wandb(lg)]
        return {"command": self.command, "overrides": list(self.overrides), "experiment": self.experiment,
                "tier": self.tier, "code": code_version(), "wandb_run_id": wandb_ids[0] if wandb_ids else None,
                "resumed_from": self.resumed_from}


def trim_metrics(path: Path, resumed_step: int) -> None:
    """Drop the rows a killed run logged after its last checkpoint (step >= ``resumed_step``):
    the resumed run logs those steps again, and they would appear twice."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), list(reader.fieldnames or [])
    kept = [r for r in rows if not (r.get("step") or "").strip() or float(r["step"]) < resumed_step]
    if len(kept) == len(rows):
        return
    write_rows(path, fields, kept)
    log.info("dropped %d metric rows logged after the checkpoint (step >= %d) from %s", len(rows) - len(kept),
             resumed_step, path)


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "python -m lipvae.train" if name in ("train.py", "__main__.py") else name


def check_shapes(state: dict, expected: dict, path: Path) -> None:
    """A checkpoint must fit the model the config builds: one line naming the first mismatch."""
    for key, value in expected.items():
        got = state.get(key)
        if got is None or tuple(got.shape) != tuple(value.shape):
            found = "missing" if got is None else f"shape {tuple(got.shape)}"
            raise UserError(
                f"checkpoint: {path} does not fit this config's model ({key}: {found}, expected"
                f" {tuple(value.shape)}); resume with the run's original overrides"
            )


def check_finite(values: dict, cfg: DictConfig) -> None:
    """A run whose results are NaN or infinite has failed, whatever else went well."""
    for key, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            raise UserError(
                f"results: {key} is {value}; the model diverged. Likely causes: module.lr={cfg.module.lr:g} too"
                f" high, or extreme enc_L={cfg.enc_L}, dec_L={cfg.dec_L}, model.beta={cfg.model.beta}"
            )


def stop_reason(early_stopping: EarlyStopping | None, finetune: FineTune | None, epochs: int, max_epochs: int,
                timed_out: bool = False) -> str:
    """Why training ended: finetune_converged or finetune_max_epochs (phase 2), patience (early
    stopping), max_time (``timed_out``: Lightning's Timer ran out, which may happen within the
    last epoch) or max_epochs."""
    phase2 = finetune is not None and finetune.active
    if phase2 and finetune.stop_reason:
        return finetune.stop_reason
    if not phase2 and early_stopping is not None and early_stopping.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
        return "patience"
    if timed_out:
        return "max_time"
    return "max_epochs" if epochs >= max_epochs else "max_time"


def _first(callbacks: list, kind: type):
    return next((cb for cb in callbacks if isinstance(cb, kind)), None)


@dataclass
class Schedule:
    """Training's callbacks: those of the ``callbacks`` group (early stopping, phase 1; the
    fine-tune phase, 2; the best/last checkpoints; any of the user's), then lipvae's epoch log,
    the stop decision kept across a resume and the checkpoint saved on a stop."""

    callbacks: list
    history: EpochHistory

    @classmethod
    def build(cls, cfg: DictConfig, run_dir: Path, echo: bool) -> Schedule:
        history = EpochHistory(echo=echo)
        saver = SaveOnException(dirpath=str(RunFolder(run_dir).checkpoints), filename="last")
        return cls([*build_entries(cfg, "callbacks"), history, KeepStop(), RandomStates(), StopBetweenSteps(), saver], history)

    @property
    def early_stopping(self) -> EarlyStopping | None:
        return _first(self.callbacks, EarlyStopping)

    @property
    def finetune(self) -> FineTune | None:
        return _first(self.callbacks, FineTune)

    @property
    def checkpoint(self) -> ModelCheckpoint | None:
        """The checkpoint of the best epoch (the first ModelCheckpoint that monitors a value)."""
        return next((cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)


@dataclass
class Built:
    """What a run is made of, before anything is fitted."""

    datamodule: object
    vae: object
    module: VAEModule
    schedule: Schedule
    loggers: list
    trainer: L.Trainer
    progress: bool


@dataclass
class Trained:
    """What fitting and freezing leave for the evaluation and the record."""

    fit_s: float
    epochs: int
    evaluated_epoch: int
    stop_reason: str
    convergence: dict
    orthonormality: float | None
    constants: dict | None


def train(cfg: DictConfig, ctx: RunContext) -> Results | None:
    """One complete run in ``ctx.run_dir``: check ``cfg`` (composed), then ``run`` it. Returns the
    results it writes (None on a device other than the first, which only trains). Needs no
    Hydra: ``train(cfg, RunContext(folder))`` from Python."""
    validate(cfg)
    return run(cfg, ctx)


def run(cfg: DictConfig, ctx: RunContext) -> Results | None:
    """The run of a checked config: build → fit → freeze → evaluate → test → record."""
    t0 = time.perf_counter()
    progress = bool(cfg.trainer.enable_progress_bar) and interactive()  # a bar redrawn into a file is debris
    schedule = Schedule.build(cfg, ctx.run_dir, echo=not progress)  # before any data is read: a bad entry fails first
    loggers = build_loggers(cfg, ctx)
    ckpt_path = checkpoint_to_resume(cfg, ctx.run_dir, ctx)  # also before any data is read
    built = build(cfg, ctx, schedule, loggers, progress)
    fitted = fit(built, cfg.trainer, ckpt_path)
    if fitted is None:
        return None
    trained = freeze(built, cfg, ctx.run_dir, *fitted)
    ev = margins(built, cfg, ctx.run_dir)
    test, test_s = timed(lambda: test_metrics(built, cfg.seed))
    draw(built, ctx.run_dir, cfg.seed)
    results = record(cfg, ctx, built, trained, test, ev)
    results.timings = {"fit_s": trained.fit_s, "epochs_s": sum(schedule.history.seconds), "test_s": test_s,
                       **ev.timings(time.perf_counter() - t0)}
    results.write(ctx.run_dir)
    log.info("results written to %s", ctx.run_dir / "results.json")
    summarise_to_wandb(built.loggers, results, ev, ctx.run_dir)
    return results


def margins(built: Built, cfg: DictConfig, run_dir: Path) -> Evaluation:
    """The certified and estimated margins of the frozen model (``lipvae.evaluation.evaluate``,
    the one pipeline, also ``python -m lipvae.evaluate``'s), its tables and figures written to the
    run folder (its timings: ``Evaluation.timings``). The global random state is left as it was, so the test
    metrics that follow draw what they would without the margins."""
    if not (cfg.margins.certify or cfg.margins.attack):
        return Evaluation()
    with torch.random.fork_rng(devices=[]):
        return evaluate(built.vae, test_split(built.datamodule), cfg, run_dir, cfg.seed, loggers=built.loggers,
                        step=built.trainer.global_step, progress=built.progress)


def test_metrics(built: Built, seed: int) -> dict:
    """The test split's metrics of the frozen model, their Monte Carlo draws seeded by the run's
    seed alone: the same weights give the same numbers, whether the run was resumed or not."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return built.trainer.test(built.module, datamodule=built.datamodule, verbose=False)[0]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path, ctx: RunContext | None = None) -> str | None:
    """The checkpoint this run continues from (``resume``), checked against the config's model;
    the metrics logged after it are dropped (they are logged again)."""
    last = RunFolder(run_dir).last_checkpoint
    if not (cfg.resume is True or (cfg.resume == "auto" and last.is_file())):
        # a start afresh where a run was killed before its first checkpoint: its rows go
        trim_metrics(run_dir / "csv" / "metrics.csv", 0)
        return None
    if not last.is_file():  # check_run_folder refuses this first; kept for train() called alone
        raise UserError(f"resume: {last} does not exist, so there is nothing to resume; drop resume=true")
    resumed = load_checkpoint(last)  # safe load: one line for a foreign or malicious file
    state = load_state(last)
    check_shapes(state, build_vae(cfg.model, input_shape_of(state, last)).state_dict(), last)
    trim_metrics(run_dir / "csv" / "metrics.csv", int(resumed.get("global_step", 0)))
    log.info("resuming from %s", last)
    if ctx is not None:
        ctx.resumed_from = {"epoch": int(resumed.get("epoch", 0)), "step": int(resumed.get("global_step", 0))}
    return str(last)


def build_loggers(cfg: DictConfig, ctx: RunContext) -> list:
    """The loggers of the ``logger`` group. Each writes into the run folder (its ``save_dir``,
    unless the entry names one); a W&B logger also gets the run's name, config and (in a sweep)
    group, runs quietly, and takes its mode from WANDB_MODE where that is set."""
    def run(cls, spec) -> dict:
        extra = {}
        if "save_dir" not in spec and "save_dir" in inspect.signature(cls).parameters:
            extra["save_dir"] = str(ctx.run_dir)
        if issubclass(cls, WandbLogger):
            os.environ.setdefault("WANDB_SILENT", "true")
            extra.update(name=cfg.name, group=spec.get("group") or ctx.group,
                         config=OmegaConf.to_container(cfg, resolve=True))
            if not os.environ.get("WANDB_MODE"):  # the environment decides where it says (W&B reads it too)
                os.environ["WANDB_MODE"] = str(spec.get("mode") or "offline")
            extra["mode"] = os.environ["WANDB_MODE"]
            if extra["mode"] == "online":
                wandb_credentials()
        return extra

    return build_entries(cfg, "logger", run)


def wandb_credentials() -> None:
    """An online W&B logger needs an API key: found (or, in a terminal, asked for) before any data
    is read, else one line (W&B's own error comes from deep inside the first log call)."""
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as e:
        raise UserError(f"logger.wandb.mode: online (logger.wandb.mode or WANDB_MODE), but W&B says: {e}; accepted:"
                        " online with an API key (wandb login, or WANDB_API_KEY), offline (wandb sync uploads"
                        " later) or logger=csv") from None


def build(cfg: DictConfig, ctx: RunContext, schedule: Schedule, loggers: list, progress: bool) -> Built:
    """Data, VAE, Lightning module and Trainer of a run, each from its config group."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data, cfg.seed)
    datamodule.setup()
    check_datamodule(datamodule)  # the contract (lipvae.data.VAEDataModule), before any model is built
    check_radii(cfg, datamodule.input_shape, cfg.model.kind == "lipschitz")
    log.info("data: %s", datamodule.info.as_dict())
    vae = build_vae(cfg.model, datamodule.input_shape)
    module = build_module(cfg.module, vae)
    finetune = schedule.finetune  # phase 2's epochs come after trainer.max_epochs (phase 1's)
    phase2 = finetune.epochs_for(vae) if finetune is not None else 0
    trainer = build_trainer(cfg.trainer, ctx.run_dir, logger=loggers or False, callbacks=schedule.callbacks,
                            plugins=[AtomicCheckpointIO()], enable_progress_bar=progress,
                            **({"max_epochs": cfg.trainer.max_epochs + phase2} if phase2 else {}))
    return Built(datamodule, vae, module, schedule, loggers, trainer, progress)


def fit(built: Built, tr: DictConfig, ckpt_path: str | None) -> tuple[float, int, bool] | None:
    """Train; the seconds it took, the epochs trained and whether the time budget ran out. After
    training on several devices rank zero alone goes on, on one (None on the others)."""
    _, fit_s = timed(lambda: built.trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=ckpt_path,
                                               weights_only=True))
    epochs, timed_out = built.trainer.current_epoch, time_is_up(built.trainer)
    if built.trainer.world_size > 1:
        if not built.trainer.is_global_zero:
            return None
        if torch.distributed.is_initialized():  # the devices are done together; what follows is rank zero's
            torch.distributed.destroy_process_group()
        built.trainer = build_trainer(tr, built.trainer.default_root_dir, devices=1, strategy="auto",
                                      logger=built.loggers or False, plugins=[AtomicCheckpointIO()],
                                      enable_progress_bar=built.progress, enable_checkpointing=False)
    return fit_s, epochs, timed_out


def freeze(built: Built, cfg: DictConfig, run_dir: Path, fit_s: float, epochs: int, timed_out: bool) -> Trained:
    """Take the evaluated weights (``evaluate``: best or last), say why training stopped
    and how far it converged, freeze the Lipschitz layers and save the frozen model."""
    evaluated_epoch, sched = epochs, built.schedule
    if cfg.evaluate == "best":  # the epoch with the lowest validation loss, not `patience` epochs on
        best = sched.checkpoint.best_model_path if sched.checkpoint is not None else ""
        evaluated_epoch = load_best_weights(built.vae, best, epochs)
    stopped_by = stop_reason(sched.early_stopping, sched.finetune, epochs, built.trainer.max_epochs, timed_out)
    converged = convergence(sched.history.val_losses, stopped_by, evaluated_epoch)
    log.info("%s", describe(converged, stopped_by, epochs))
    lipschitz = built.vae.kind == "lipschitz"
    orthonormality = orthonormality_error(built.vae) if lipschitz else None  # how much freezing changes
    built.vae.freeze()
    constants = built.vae.lipschitz_constants()
    if lipschitz:
        check_lipschitz(constants)
        log.info("Lipschitz constants after freezing: %s", constants)
    replace_atomically(RunFolder(run_dir).frozen_model, lambda partial: torch_save(built.vae.state_dict(), partial))
    return Trained(fit_s, epochs, evaluated_epoch, stopped_by, converged, orthonormality,
                   constants if lipschitz else None)


def draw(built: Built, run_dir: Path, seed: int) -> None:
    """Reconstructions, prior samples and (2-D latents) the aggregate posterior, as PNG files and
    logged images."""
    vae, loggers, device = built.vae, built.loggers, built.module.device
    test = built.datamodule.split("test")
    save_reconstructions(vae, test.images[:8].to(device), run_dir / "reconstructions.png", loggers)
    gen = torch.Generator().manual_seed(seed)
    log_image(loggers, "prior_samples", save_prior_samples(vae, run_dir / "prior_samples.png", generator=gen))
    if vae.latent_dim == 2:
        figure = save_aggregate_posterior(vae, test.images.to(device), test.labels, run_dir / "aggregate_posterior.png")
        log_image(loggers, "aggregate_posterior", figure)


def record(cfg: DictConfig, ctx: RunContext, built: Built, trained: Trained, test: dict, ev: Evaluation) -> Results:
    """results.json's contents (docs/results.md), once every value is finite."""
    vae = built.vae
    metrics = {
        "test_elbo": test.get("test/elbo"), "test_log_likelihood": test.get("test/log_likelihood"),
        "test_kl": test.get("test/kl"), "epochs": trained.epochs, "evaluated_epoch": trained.evaluated_epoch,
        "best_val_loss": _best_score(built.schedule.checkpoint),
        "final_phase": built.schedule.finetune.phase if built.schedule.finetune else "train",
        "stop_reason": trained.stop_reason, "convergence": trained.convergence,
        "orthonormality_error_before_freeze": trained.orthonormality,
    }
    check_finite({f"metrics.{k}": metrics[k] for k in ("test_elbo", "test_log_likelihood", "test_kl",
                                                        "orthonormality_error_before_freeze")}, cfg)
    std = {"mode": vae.std_mode, "gamma": vae.gamma if vae.std_mode == "fixed" else None,
           "max_norm": vae.max_norm if vae.std_mode == "bounded" else None}
    return Results(
        status="completed", run=ctx.record(built.loggers), config=OmegaConf.to_container(cfg, resolve=True),
        model={"kind": vae.kind, "latent_dim": vae.latent_dim, "encoder_std": std, "beta": vae.beta,
               "likelihood": vae.likelihood, "arch": str(vae.arch)},
        lipschitz=trained.constants, data=built.datamodule.info.as_dict(), metrics=metrics, **ev.results(),
    )


def _best_score(checkpoint: ModelCheckpoint | None) -> float | None:
    score = None if checkpoint is None else checkpoint.best_model_score
    return None if score is None else float(score)


def summarise_to_wandb(loggers: list, results: Results, ev: Evaluation, run_dir: Path) -> None:
    """The run's headline numbers as the W&B run's summary (``wandb_extras`` too) and, online (or
    with ``LIPVAE_WANDB_MODEL=1``), the frozen model as an artifact; the W&B run is then finished."""
    for lg in loggers:
        if not is_wandb(lg):
            continue
        summary = {f"results/{k}": v for k, v in results.metrics.items()}
        for name, part in (("certified", ev.certified), ("estimated", ev.estimated)):
            for k in ("mean", "median", "min", "fraction_certified", "global_margin", "holds_with_probability"):
                if part and part.get(k) is not None:
                    summary[f"results/{name}_{k}"] = part[k]
        if ev.soundness_violations is not None:
            summary["results/soundness_violations"] = ev.soundness_violations
        summary.update(wandb_extras(results))
        lg.experiment.summary.update(summary)
        if os.environ.get("WANDB_MODE") == "online" or os.environ.get("LIPVAE_WANDB_MODEL") == "1":
            _log_model_artifact(lg, RunFolder(run_dir).frozen_model)  # online by default; offline on request
        lg.experiment.finish()


def wandb_extras(results: Results) -> dict:
    """What a W&B dashboard needs beside the metrics and margins: the measured, nominal and bound
    Lipschitz constants, the latent attack's numbers, the timings, the status and whether the run
    was resumed (flat ``results/...`` keys, groupable like the config's ``enc_L``)."""
    out = {"results/status": results.status}
    for kind in ("nominal", "bound", "measured"):
        for net, value in ((results.lipschitz or {}).get(kind) or {}).items():
            out[f"results/lipschitz_{kind}_{net}"] = value
    for k, v in (results.latent_attack or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"results/latent_attack_{k}"] = v
    for k, v in (results.timings or {}).items():
        out[f"results/time_{k}"] = v
    out["results/resumed"] = bool((results.run or {}).get("resumed_from"))
    return out


def _log_model_artifact(logger, path: Path) -> None:
    """The frozen weights as a W&B artifact of type ``model`` (offline: kept for ``wandb sync``)."""
    import wandb

    if not path.is_file():
        return
    artifact = wandb.Artifact(name=f"model-{logger.experiment.id}", type="model",
                              metadata={"file": path.name})
    artifact.add_file(str(path))
    logger.experiment.log_artifact(artifact)
