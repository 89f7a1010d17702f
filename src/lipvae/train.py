"""Entry point: ``python -m lipvae.train [overrides] [-m]``.

Trains (and, for Lipschitz models, fine-tunes and freezes) a VAE, evaluates it on the
test split, and writes ``results.json`` with everything a report needs.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from lipvae.certify.certificates import check_lipschitz
from lipvae.stored import load_checkpoint, load_state
from lipvae.config import (build_callbacks, build_datamodule, build_extra_loggers, build_vae, check_overrides,
                           check_yaml_files,
                           named_fields, validate)
from lipvae.errors import UserError
from lipvae.evaluate import evaluate
from lipvae.logs import EpochHistory, convergence, describe, interactive, quiet_third_party, time_is_up
from lipvae.module import FineTune, NonFiniteLossError, RunCheckpoint, SaveOnException, VAEModule
from lipvae.networks import orthonormality_error
from lipvae.plots import is_wandb, log_image, save_aggregate_posterior, save_prior_samples, save_reconstructions
from lipvae.results import atomic_write_text, code_version, replace_atomically, write_results
from lipvae.sweep import note_refusal
from lipvae.runfolder import AlreadyCompleted, RunFolderError, check_run_folder, claim, read_status, save_hydra_files

log = logging.getLogger("lipvae")


def sweep_group() -> str | None:
    """The W&B group shared by the runs of one multirun: named after its sweep folder (None for
    a single run, and for ``run()`` called outside Hydra)."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    parts = Path(hc.sweep.dir).parts
    return "_".join(parts[-3:]) if len(parts) >= 3 else "_".join(parts)


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning's writer deletes it) and adds to it. Every save
    replaces the file atomically: Lightning's writer rewrites it in place when a new column
    appears, and a signal landing in that rewrite left a truncated file (rows and columns of
    earlier epochs lost)."""

    def _check_log_dir_exists(self) -> None:
        self._rows: list[dict] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._rows = list(reader)
                self.metrics_keys = list(reader.fieldnames or [])

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        rows = self._rows + self.metrics
        write_rows(Path(self.metrics_file_path), self.metrics_keys, rows)
        self._rows, self.metrics = rows, []


def write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """A metrics CSV replaced atomically (a signal never leaves it cut short)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


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


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to csv/metrics.csv: the curves
    from before a stop are kept."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers: list = []
    if cfg.logger.csv:
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name="csv", version=""))
    wb = cfg.logger.wandb
    if wb.enabled:
        if not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = wb.mode
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(build_wandb_logger(wb, name=cfg.name, save_dir=str(run_dir),
                                          config=OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def build_wandb_logger(wb: DictConfig, **run) -> Logger:
    """The W&B logger of ``logger.wandb``, from its ``_target_`` (WandbLogger for runs recorded
    before the field existed) and the fields the class takes; ``run``: the run's name, folder
    and config. A sweep's runs share a group unless one is given."""
    from hydra.utils import get_class

    target = wb.get("_target_", "lightning.pytorch.loggers.WandbLogger")
    cls = get_class(target)
    fields = named_fields(wb, cls, skip=("enabled", "mode"))
    fields["group"] = fields.get("group") or sweep_group()
    return cls(**fields, **run)  # not instantiate(): the run's config must not be read as one


def run_context(loggers) -> dict:
    """What a reader of the results needs to redo the run: command, overrides, code, W&B id
    (outside Hydra, as when ``run()`` is called from Python, no overrides and no experiment)."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    wandb_ids = [lg.experiment.id for lg in loggers if is_wandb(lg)]
    return {
        "command": " ".join([_program(), *sys.argv[1:]]),
        "overrides": list(hc.overrides.task) if hc else [],
        "experiment": hc.runtime.choices.get("experiment") if hc else None,
        "code": code_version(),
        "wandb_run_id": wandb_ids[0] if wandb_ids else None,
    }


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "python -m lipvae.train" if name in ("train.py", "__main__.py") else name


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to ``<name>.partial`` and renamed: a full disk or a kill never
    leaves a truncated ``last.ckpt`` behind (nor the partial file)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        replace_atomically(Path(path), lambda partial: super(AtomicCheckpointIO, self).save_checkpoint(
            checkpoint, partial, storage_options))


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
                f"results: {key} is {value}; the model diverged. Likely causes: model.lr={cfg.model.lr:g} too"
                f" high, or extreme enc_L={cfg.enc_L}, dec_L={cfg.dec_L}, model.beta={cfg.model.beta}"
            )


def schedule_callbacks(patience: int, max_epochs: int, finetune: DictConfig | dict | None):
    """Phase 1: Lightning's EarlyStopping on the validation loss, checked when validation ends so
    that phase 2, the fine-tune callback (``finetune``: trainer.finetune's settings, or None for
    none), has the last word at the epoch's end."""
    early_stopping = EarlyStopping(monitor="val/loss", mode="min", patience=patience, check_on_train_epoch_end=False)
    if not finetune:
        return early_stopping, None
    return early_stopping, FineTune(max_epochs, finetune["max_epochs"], finetune["bjorck_iters"], finetune["lr"],
                                    finetune["tol"], finetune["patience"])


def stop_reason(early_stopping: EarlyStopping, finetune: FineTune | None, epochs: int, max_epochs: int,
                timed_out: bool = False) -> str:
    """Why training ended: finetune_converged or finetune_max_epochs (phase 2), patience (early
    stopping), max_time (``timed_out``: Lightning's Timer ran out, which may happen within the
    last epoch) or max_epochs."""
    if finetune is not None and finetune.stop_reason:
        return finetune.stop_reason
    if finetune is None and early_stopping.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
        return "patience"
    if timed_out:
        return "max_time"
    return "max_epochs" if epochs >= max_epochs else "max_time"


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """One complete run; returns the results dictionary it also writes (None on a device
    other than the first, which only trains)."""
    t0 = time.perf_counter()
    validate(cfg)
    extra_callbacks = build_callbacks(cfg)  # before any data is read: a bad entry fails first
    extra_loggers = build_extra_loggers(cfg, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = None
    last = ckpt_dir / "last.ckpt"
    if cfg.resume is True or (cfg.resume == "auto" and last.is_file()):  # checked before any data is read
        if not last.is_file():  # check_run_folder refuses this first; kept for run() called alone
            raise UserError(f"resume: {last} does not exist, so there is nothing to resume; drop resume=true")
        resumed = load_checkpoint(last)  # safe load: one line for a foreign or malicious file
        check_shapes(load_state(last), build_vae(cfg.model).state_dict(), last)
        ckpt_path = str(last)
        trim_metrics(run_dir / "csv" / "metrics.csv", int(resumed.get("global_step", 0)))
        log.info("resuming from %s", last)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data, cfg.seed)
    datamodule.setup()
    log.info("data: %s", datamodule.info.as_dict())
    vae = build_vae(cfg.model)
    lipschitz = cfg.model.kind == "lipschitz"
    project = cfg.model.bjorck.project_iters if lipschitz else 0
    module = VAEModule(vae, lr=cfg.model.lr, num_importance=cfg.trainer.num_importance, project_iters=project)
    tr = cfg.trainer
    bar = bool(tr.enable_progress_bar) and interactive()  # a bar redrawn into a file is debris
    history = EpochHistory(echo=not bar)
    finetune_epochs = tr.finetune.max_epochs if lipschitz else 0
    early_stopping, finetune = schedule_callbacks(tr.patience, tr.max_epochs, tr.finetune if finetune_epochs else None)
    checkpoint = RunCheckpoint(
        dirpath=str(ckpt_dir), filename="best", monitor="val/loss", save_last=True, save_top_k=1
    )
    schedule = [early_stopping, *([finetune] if finetune else []), checkpoint, history,
                SaveOnException(dirpath=str(ckpt_dir), filename="last")]
    loggers = make_loggers(cfg, run_dir) + extra_loggers
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        precision=tr.precision,
        strategy=tr.strategy,
        plugins=[AtomicCheckpointIO()],
        max_epochs=tr.max_epochs + finetune_epochs,
        max_time=None if tr.max_time is None else timedelta(minutes=tr.max_time),
        callbacks=[*schedule, *extra_callbacks],
        logger=loggers or False,
        log_every_n_steps=tr.log_every_n_steps,
        enable_progress_bar=bar,
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
    )

    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_s = time.perf_counter() - t_fit
    epochs_trained = trainer.current_epoch
    timed_out = time_is_up(trainer)
    if trainer.world_size > 1:  # trained on several devices: rank zero alone evaluates and records
        if not trainer.is_global_zero:
            return None
        trainer = L.Trainer(
            accelerator=tr.accelerator, devices=1, precision=tr.precision, logger=loggers or False,
            enable_progress_bar=bar, default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()],
        )
    evaluated_epoch = epochs_trained
    best = checkpoint.best_model_path
    if tr.evaluate == "best" and best and Path(best).is_file():
        # the weights of the epoch with the lowest validation loss, not those `patience` epochs on
        state = load_checkpoint(Path(best))
        module.load_state_dict(state["state_dict"])
        evaluated_epoch = int(state["epoch"]) + 1
        log.info("evaluating the best epoch (%d of %d): %s", evaluated_epoch, epochs_trained, best)

    stopped_by = stop_reason(early_stopping, finetune, epochs_trained, tr.max_epochs + finetune_epochs, timed_out)
    converged = convergence(history.val_losses, stopped_by, evaluated_epoch)
    log.info("%s", describe(converged, stopped_by, epochs_trained))
    orthonormality = orthonormality_error(vae)  # how much freezing will change the trained function
    vae.freeze()
    constants = vae.lipschitz_constants()
    if lipschitz:
        check_lipschitz(constants)
        log.info("Lipschitz constants after freezing: %s", constants)
    replace_atomically(run_dir / "frozen_model.pt", lambda partial: torch.save(vae.state_dict(), partial))

    t_test = time.perf_counter()
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    test_s = time.perf_counter() - t_test
    # the one evaluation pipeline (also `python -m lipvae.evaluate`): certify, attack, soundness check
    ev = evaluate(vae, datamodule.split("test"), cfg, run_dir, cfg.seed, loggers=loggers,
                  step=trainer.global_step, progress=bar)
    x = datamodule.split("test").images[:8].to(module.device)
    save_reconstructions(vae, x, run_dir / "reconstructions.png", loggers)
    gen = torch.Generator().manual_seed(cfg.seed)
    log_image(loggers, "prior_samples", save_prior_samples(vae, run_dir / "prior_samples.png", generator=gen))
    if vae.latent_dim == 2:
        test_split = datamodule.split("test")
        figure = save_aggregate_posterior(
            vae, test_split.images.to(module.device), test_split.labels, run_dir / "aggregate_posterior.png"
        )
        log_image(loggers, "aggregate_posterior", figure)

    check_finite({
        "metrics.test_elbo": test.get("test/elbo"),
        "metrics.test_log_likelihood": test.get("test/log_likelihood"),
        "metrics.test_kl": test.get("test/kl"),
        "metrics.orthonormality_error_before_freeze": orthonormality if lipschitz else 0.0,
    }, cfg)
    results = {
        "status": "completed",
        "run": run_context(loggers),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model": {
            "kind": vae.kind,
            "latent_dim": vae.latent_dim,
            "encoder_std": {
                "mode": vae.std_mode,
                "gamma": vae.gamma if vae.std_mode == "fixed" else None,
                "max_norm": vae.max_norm if vae.std_mode == "bounded" else None,
            },
            "beta": vae.beta,
            "likelihood": vae.likelihood,
        },
        "lipschitz": constants if lipschitz else None,
        "data": datamodule.info.as_dict(),
        "metrics": {
            "test_elbo": test.get("test/elbo"),
            "test_log_likelihood": test.get("test/log_likelihood"),
            "test_kl": test.get("test/kl"),
            "epochs": epochs_trained,
            "evaluated_epoch": evaluated_epoch,
            "best_val_loss": None if checkpoint.best_model_score is None else float(checkpoint.best_model_score),
            "final_phase": finetune.phase if finetune else "train",
            "stop_reason": stopped_by,
            "convergence": converged,
            "orthonormality_error_before_freeze": orthonormality if lipschitz else None,
        },
        **ev.results(),
        "timings": {
            "fit_s": fit_s,
            "test_s": test_s,
            "certify_s": ev.certify_s,
            "attack_s": ev.attack_s,
            "total_s": time.perf_counter() - t0,
        },
    }
    write_results(run_dir, results)
    log.info("results written to %s", run_dir / "results.json")
    for lg in loggers:
        if is_wandb(lg):
            summary = {f"results/{k}": v for k, v in results["metrics"].items()}
            for name, part in (("certified", ev.certified), ("estimated", ev.estimated)):
                for k in ("mean", "median", "min", "fraction_certified", "global_margin", "holds_with_probability"):
                    if part and part.get(k) is not None:
                        summary[f"results/{name}_{k}"] = part[k]
            if ev.soundness_violations is not None:
                summary["results/soundness_violations"] = ev.soundness_violations
            lg.experiment.summary.update(summary)
            lg.experiment.finish()
    return results


def _record(cfg: DictConfig, run_dir: Path, status: str, error: str) -> None:
    """Record a failed or interrupted attempt; never over a completed record (beside it instead)."""
    record = {"status": status, "error": error, "config": OmegaConf.to_container(cfg, resolve=False)}
    if read_status(run_dir) == "completed":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        atomic_write_text(run_dir / f"attempt-{stamp}-{status}.json", json.dumps(record, indent=2) + "\n")
    else:
        write_results(run_dir, record)


def resume_hint(run_dir: Path) -> str:
    """How to continue this run. A sweep job is resumed alone, in run mode, in its own folder."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return f"resume with the same command plus hydra.run.dir={run_dir} resume=true"
    overrides = " ".join(shlex.quote(o) for o in hc.overrides.task if not o.startswith("resume="))
    return f"resume this job alone with: {_program()} {overrides} hydra.run.dir={run_dir} resume=true"


_signal: dict = {"received": None}


def _on_signal(signum, frame) -> None:
    """SIGTERM and SIGINT stop the run in every phase: Lightning treats the KeyboardInterrupt as a
    graceful stop (the last state is saved during fit); main() records the run as interrupted."""
    _signal["received"] = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _other_rank() -> bool:
    """A process that Lightning started for a device other than the first (DDP)."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("LOCAL_RANK", "NODE_RANK"))


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()  # again here: a sweep's worker processes start without cli()'s filters
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    rank_zero = not _other_rank()  # other ranks share rank zero's folder and leave it to rank zero
    try:  # before anything is written to the folder
        if rank_zero:
            check_run_folder(cfg, run_dir)
            lock = claim(run_dir)  # noqa: F841 (held until the process ends)
    except AlreadyCompleted as e:
        log.info("%s", e)
        print(str(e), file=sys.stderr)
        return None
    except RunFolderError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        if multirun:  # the sweep goes on; its summary lists this job as refused and exits non-zero
            note_refusal(run_dir, str(e))
            return None
        sys.exit(2)
    if rank_zero:
        save_hydra_files(cfg, run_dir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    _signal["received"] = None
    status = "failed"
    try:
        results = run(cfg, run_dir)
    except (UserError, NonFiniteLossError) as e:
        message = str(e).splitlines()[0]
        if isinstance(e, NonFiniteLossError) and (run_dir / "checkpoints" / "last.ckpt").is_file():
            message += f"; last finite state saved: {resume_hint(run_dir)}"
        code, error = 2, message
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        code, error = 2, (f"no space left while writing to the run folder {run_dir} ({e.strerror}); free space, then"
                          f" {resume_hint(run_dir)}")
    except (KeyboardInterrupt, SystemExit) as e:
        # our handler raises KeyboardInterrupt; Lightning turns it into SystemExit(1) after its graceful stop
        if _signal["received"] is None and isinstance(e, SystemExit) and e.code in (0, None):
            raise
        signum = _signal["received"] or signal.SIGINT
        code = 128 + int(signum)
        status = "interrupted"
        error = f"interrupted ({signal.Signals(signum).name}); {resume_hint(run_dir)}"
    except Exception as e:
        if rank_zero:
            _record(cfg, run_dir, "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if multirun:  # a bug in one job: record it, keep the sweep going, and show the trace
            log.exception("job failed")
            return None
        raise
    else:
        return None if results is None else results["metrics"]["test_elbo"]
    try:
        if rank_zero:
            _record(cfg, run_dir, status, error)
    except OSError as e:  # the disk may still be full
        log.error("could not record the failure (%s)", e.strerror)
    log.error("%s", error)
    if multirun and code == 2:  # the other jobs of the sweep go on; the report lists this one as failed
        return None
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


def cli() -> None:
    """``python -m lipvae.train``: the command line's overrides are checked (one line on a
    mistake, exit 2) before Hydra composes and runs the job."""
    quiet_third_party()
    try:
        check_yaml_files(sys.argv[1:])
        composed = check_overrides(sys.argv[1:])
        if composed is not None:  # before Hydra creates the run folder (from `name`): nothing is written for a bad value
            validate(composed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
