"""Entry point: ``python -m lipvae.train [overrides] [-m]``.

Trains (and, for Lipschitz models, fine-tunes and freezes) a VAE, evaluates it on the
test split, and writes ``results.json`` with everything a report needs.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lipvae.attack_callback import AttackCallback
from lipvae.certify.callback import CertifyCallback
from lipvae.certify.certificates import check_lipschitz
from lipvae.certify.recertify import load_state
from lipvae.config import build_datamodule, build_vae, validate
from lipvae.errors import UserError
from lipvae.module import NonFiniteLossError, SaveOnInterrupt, TrainingSchedule, VAEModule
from lipvae.networks import orthonormality_error
from lipvae.plots import is_wandb, log_image, save_aggregate_posterior, save_prior_samples, save_reconstructions
from lipvae.results import write_results

log = logging.getLogger("lipvae")


def sweep_group() -> str | None:
    """The W&B group shared by the runs of one multirun: named after its sweep folder."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    parts = Path(hc.sweep.dir).parts
    return "_".join(parts[-3:]) if len(parts) >= 3 else "_".join(parts)


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers: list = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    wb = cfg.logger.wandb
    if wb.enabled:
        import os

        from lightning.pytorch.loggers import WandbLogger

        if not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = wb.mode
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                project=wb.project,
                entity=wb.entity,
                group=wb.group or sweep_group(),
                tags=list(wb.tags),
                name=cfg.name,
                save_dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def code_version() -> str:
    """The git commit of the source checkout lipvae runs from (``+dirty`` with local edits),
    or the package version when it was installed from a wheel."""
    import subprocess

    import lipvae

    here = Path(lipvae.__file__).resolve().parent
    if not (here.parents[1] / ".git").exists():  # installed from a wheel: no checkout to ask
        return f"lipvae {lipvae.__version__}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"lipvae {lipvae.__version__}"


def run_context(loggers) -> dict:
    """What a reader of the results needs to redo the run: command, overrides, code, W&B id."""
    hc = HydraConfig.get()
    wandb_ids = [lg.experiment.id for lg in loggers if is_wandb(lg)]
    return {
        "command": " ".join([_program(), *sys.argv[1:]]),
        "overrides": list(hc.overrides.task),
        "experiment": hc.runtime.choices.get("experiment"),
        "code": code_version(),
        "wandb_run_id": wandb_ids[0] if wandb_ids else None,
    }


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "python -m lipvae.train" if name in ("train.py", "__main__.py") else name


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """One complete run; returns the results dictionary it also writes."""
    t0 = time.perf_counter()
    validate(cfg)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = None
    if cfg.resume:  # checked before any data is read: a bad checkpoint is a one-line error
        last = ckpt_dir / "last.ckpt"
        if last.is_file():
            load_state(last)  # refuses, in one line, a file that is not a safe checkpoint
            ckpt_path = str(last)
            log.info("resuming from %s", last)
        else:
            log.warning("resume=true but %s does not exist: starting from scratch", last)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data, cfg.seed)
    datamodule.setup()
    log.info("data: %s", datamodule.info.as_dict())
    vae = build_vae(cfg.model)
    lipschitz = cfg.model.kind == "lipschitz"
    project = cfg.model.bjorck.project_iters if lipschitz else 0
    module = VAEModule(vae, lr=cfg.model.lr, num_importance=cfg.trainer.num_importance, project_iters=project)
    tr = cfg.trainer
    schedule = TrainingSchedule(
        max_epochs=tr.max_epochs,
        patience=tr.patience,
        finetune_epochs=tr.finetune.max_epochs if lipschitz else 0,
        finetune_iters=tr.finetune.bjorck_iters,
        finetune_lr=tr.finetune.lr,
        finetune_tol=tr.finetune.tol,
        finetune_patience=tr.finetune.patience,
    )
    checkpoint = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="best", monitor="val/loss", save_last=True, save_top_k=1
    )
    certifier = CertifyCallback(
        run_dir,
        r=cfg.certify.r,
        p=cfg.certify.p,
        forms=cfg.certify.forms,
        num_inputs=cfg.certify.num_inputs,
        batch_size=cfg.data.eval_batch_size,
    )
    attacker = AttackCallback(run_dir, cfg.attack, certifier if cfg.certify.enabled else None, seed=cfg.seed)
    test_callbacks = [certifier] if cfg.certify.enabled else []
    if cfg.attack.enabled:
        test_callbacks.append(attacker)
    loggers = make_loggers(cfg, run_dir)
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        precision=tr.precision,
        max_epochs=schedule.total_epochs,
        max_time=None if tr.max_time is None else timedelta(minutes=tr.max_time),
        callbacks=[schedule, checkpoint, SaveOnInterrupt(ckpt_dir / "last.ckpt")],
        logger=loggers or False,
        log_every_n_steps=tr.log_every_n_steps,
        enable_progress_bar=tr.enable_progress_bar,
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
    )

    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_s = time.perf_counter() - t_fit
    evaluated_epoch = trainer.current_epoch
    best = checkpoint.best_model_path
    if tr.evaluate == "best" and best and Path(best).is_file():
        # the weights of the epoch with the lowest validation loss, not those `patience` epochs on
        state = torch.load(best, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        evaluated_epoch = int(state["epoch"]) + 1
        log.info("evaluating the best epoch (%d of %d): %s", evaluated_epoch, trainer.current_epoch, best)

    orthonormality = orthonormality_error(vae)  # how much freezing will change the trained function
    vae.freeze()
    constants = vae.lipschitz_constants()
    if lipschitz:
        check_lipschitz(constants)
        log.info("Lipschitz constants after freezing: %s", constants)
    torch.save(vae.state_dict(), run_dir / "frozen_model.pt")

    t_test = time.perf_counter()
    trainer.callbacks.extend(test_callbacks)
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    test_s = time.perf_counter() - t_test - certifier.seconds - attacker.seconds
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
            "epochs": trainer.current_epoch,
            "evaluated_epoch": evaluated_epoch,
            "best_val_loss": None if checkpoint.best_model_score is None else float(checkpoint.best_model_score),
            "final_phase": schedule.phase,
            "stop_reason": schedule.stop_reason or ("max_time" if tr.max_time is not None else "max_epochs"),
            "orthonormality_error_before_freeze": orthonormality if lipschitz else None,
        },
        "certified": certifier.summary,
        "estimated": attacker.summary,
        "latent_attack": attacker.latent,
        "soundness_violations": attacker.violations,
        "timings": {
            "fit_s": fit_s,
            "test_s": test_s,
            "certify_s": certifier.seconds,
            "attack_s": attacker.seconds,
            "total_s": time.perf_counter() - t0,
        },
    }
    write_results(run_dir, results)
    log.info("results written to %s", run_dir / "results.json")
    for lg in loggers:
        if is_wandb(lg):
            summary = {f"results/{k}": v for k, v in results["metrics"].items()}
            for name, part in (("certified", certifier.summary), ("estimated", attacker.summary)):
                for k in ("mean", "median", "min", "fraction_certified", "global_margin"):
                    if part and part.get(k) is not None:
                        summary[f"results/{name}_{k}"] = part[k]
            if attacker.violations is not None:
                summary["results/soundness_violations"] = attacker.violations
            lg.experiment.summary.update(summary)
            lg.experiment.finish()
    return results


def _fail(cfg: DictConfig, run_dir: Path, error: str) -> None:
    config = OmegaConf.to_container(cfg, resolve=False)
    write_results(run_dir, {"status": "failed", "error": error, "config": config})


RESUME_HINT = "resume with the same command plus hydra.run.dir={run_dir} resume=true"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        results = run(cfg, run_dir)
    except (UserError, NonFiniteLossError) as e:
        message = str(e).splitlines()[0]
        if isinstance(e, NonFiniteLossError) and (run_dir / "checkpoints" / "last.ckpt").is_file():
            message += f"; last finite state saved: {RESUME_HINT.format(run_dir=run_dir)}"
        code, error = 2, message
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns SIGINT into SystemExit(1) and SIGTERM into SIGTERMException(SystemExit)
        signal_name = "SIGTERM" if type(e).__name__ == "SIGTERMException" else "SIGINT"
        code = 143 if signal_name == "SIGTERM" else 130
        error = f"interrupted ({signal_name}); {RESUME_HINT.format(run_dir=run_dir)}"
    except Exception as e:
        _fail(cfg, run_dir, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if multirun:  # a bug in one job: record it, keep the sweep going, and show the trace
            log.exception("job failed")
            return None
        raise
    else:
        return results["metrics"]["test_elbo"]
    _fail(cfg, run_dir, error)
    log.error("%s", error)
    if multirun and code == 2:  # the other jobs of the sweep go on; the report lists this one as failed
        return None
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
