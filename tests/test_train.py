import json
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from conftest import SMOKE, composed, run_cli
from lipvae.lightning.callbacks import FineTune

def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def check_schema(r: dict) -> None:
    assert r["schema_version"] == 3 and r["status"] == "completed"
    for key in ("config", "model", "lipschitz", "data", "metrics", "certified", "estimated", "timings"):
        assert key in r
    assert r["data"]["split"] == "resplit-test"
    assert r["data"]["num_train"] + r["data"]["num_val"] + r["data"]["num_test"] == 600
    for key in ("test_elbo", "test_log_likelihood", "test_kl"):
        assert isinstance(r["metrics"][key], float)
    assert r["metrics"]["test_kl"] > 0
    assert r["timings"]["total_s"] >= r["timings"]["fit_s"] > 0
    if r["run"].get("resumed_from") is None:  # every epoch lies inside this process's fit
        assert 0 < r["timings"]["epochs_s"] <= r["timings"]["fit_s"]


@pytest.mark.slow
def test_single_lipschitz_run(tmp_path):
    # with extra Lightning callbacks from the callbacks group and from the command line
    extra = tmp_path.parent / f"{tmp_path.name}_extra"
    # and the default loggers (the smoke preset's logger=csv switched back to CSV + W&B, which is
    # offline unless the user logs in) plus one more from the command line
    assert composed().logger.wandb.mode == "offline"
    proc = run_cli(*SMOKE, "enc_L=4", "dec_L=6", f"hydra.run.dir={tmp_path}", "callbacks=monitors",
                   "+callbacks.copy._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                   f"+callbacks.copy.dirpath={extra}", "+callbacks.copy.filename=copy", "logger=default",
                   "+logger.second._target_=lightning.pytorch.loggers.CSVLogger",
                   "+logger.second.name=second", "+logger.second.version=0",
                   env={"WANDB_MODE": "", "WANDB_API_KEY": "", "LIPVAE_WANDB_MODEL": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = load(tmp_path)
    check_schema(r)
    assert r["model"] == {
        "kind": "lipschitz",
        "latent_dim": 10,
        "encoder_std": {"mode": "learned", "gamma": None, "max_norm": None},
        "beta": 1.0,
        "likelihood": "continuous_bernoulli",
        "arch": "mlp",
    }
    nominal, measured = r["lipschitz"]["nominal"], r["lipschitz"]["measured"]
    assert nominal == {"encoder_mean": 4.0, "encoder_std": 4.0, "decoder": 6.0}
    # each network's own constant, its sigmoid head (slope 1/4) included
    assert r["lipschitz"]["bound"] == pytest.approx({"encoder_mean": 4.0, "encoder_std": 1.0, "decoder": 1.5})
    assert measured["encoder_mean"] == pytest.approx(4.0, rel=1e-3)
    assert measured["encoder_std"] == pytest.approx(1.0, rel=1e-3)  # sigmoid head: 4 / 4
    assert measured["decoder"] == pytest.approx(1.5, rel=1e-3)
    assert r["metrics"]["final_phase"] == "done" and r["metrics"]["epochs"] == 2
    assert r["metrics"]["stop_reason"] in ("finetune_converged", "finetune_max_epochs")
    # the weights tested are those of the epoch with the lowest validation loss
    val = pd.read_csv(tmp_path / "csv" / "metrics.csv").dropna(subset=["val/loss"])
    best = val.loc[val["val/loss"].idxmin()]
    assert r["metrics"]["evaluated_epoch"] == int(best["epoch"]) + 1
    assert r["metrics"]["best_val_loss"] == pytest.approx(float(best["val/loss"]), rel=1e-6)
    for f in ("reconstructions.png", "frozen_model.pt", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (tmp_path / f).is_file(), f
    assert "lr-Adam" in pd.read_csv(tmp_path / "csv" / "metrics.csv").columns  # LearningRateMonitor
    assert (extra / "copy.ckpt").is_file()  # the command line's ModelCheckpoint
    second = pd.read_csv(tmp_path / "second" / "version_0" / "metrics.csv")  # the extra logger, in the run
    assert "val/loss" in second.columns and second["val/loss"].notna().sum() == 2
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B's offline record
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    assert b"results/test_elbo" in blob and b"val/loss" in blob
    assert b"results/certified_mean" in blob and b"certified_margins" in blob
    # the constants, the latent attack, timings, status and the frozen model as an artifact
    for key in (b"results/lipschitz_measured_decoder", b"results/lipschitz_nominal_encoder_mean",
                b"results/latent_attack_mean_dist_to_target", b"results/time_fit_s", b"results/status",
                b"results/resumed", b"frozen_model.pt"):
        assert key in blob, key


@pytest.mark.slow
def test_standard_beta_vae_with_fixed_std(tmp_path):
    # with the other attack choices: the reference L-BFGS-B procedure and the soft latent attack
    proc = run_cli(
        *SMOKE, "model=standard", "model.beta=5", "model.encoder_std.mode=fixed", "attack=lbfgs",
        "attack.lbfgs.maxiter=10", "margins.attacked_inputs=2", "margins/latent=soft", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = load(tmp_path)
    check_schema(r)
    assert r["lipschitz"] is None and r["model"]["kind"] == "standard"
    assert r["model"]["beta"] == 5.0 and r["model"]["encoder_std"]["gamma"] == 0.1
    assert r["metrics"]["epochs"] == 1  # no fine-tune phase for a standard VAE
    assert r["estimated"]["method"] == "lbfgs" and r["estimated"]["search"] == "grid"
    assert r["estimated"]["steps"] is None and r["estimated"]["tol"] is None  # it has neither
    assert not {"steps", "tol", "search", "warm_steps", "compile"} & set(r["config"]["attack"])  # only its fields
    margins = pd.read_csv(tmp_path / "margins.csv")
    assert len(margins) == 2 and ((margins["estimated"] * 2).round() == margins["estimated"] * 2).all()  # on the grid
    assert r["latent_attack"]["kind"] == "soft" and r["latent_attack"]["penalty"] == 1.0
    assert r["latent_attack"]["budget"] is None and r["latent_attack"]["mean_delta_norm"] > 0


@pytest.mark.slow
def test_multirun_over_lipschitz_grid(sweep):
    """Each job of a sweep (conftest's ``enc_L=5,-1,7``) measures its own constants; the command
    line is checked at each sweep's first value, and a later job's bad value (enc_L=-1) is refused
    by the same validation before its folder is read or written: the other jobs run, and the
    sweep's summary names the refused one and exits non-zero."""
    proc = json.loads((sweep / "command.json").read_text())
    assert proc["returncode"] == 1
    assert "error: 1 of 3 jobs failed" in proc["stderr"]
    assert "error: enc_L: got -1; accepted: a positive number" in proc["stdout"] + proc["stderr"]
    runs = sorted(p.parent for p in sweep.glob("*/results.json") if p.parent.name != "8_torn")
    assert len(runs) == 2  # nothing written for the refused job
    got = {}
    for run in runs:
        r = load(run)
        check_schema(r)
        assert r["status"] == "completed"
        got[r["config"]["enc_L"]] = r["lipschitz"]["measured"]["encoder_mean"]
    assert got == {5.0: pytest.approx(5.0, rel=1e-3), 7.0: pytest.approx(7.0, rel=1e-3)}


def test_bad_input_is_one_line(tmp_path):
    proc = run_cli(*SMOKE, "enc_L=-1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: enc_L: got -1; accepted: a positive number"
    )
    assert "Traceback" not in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before the run folder was written


@pytest.mark.slow
def test_time_budget_ends_training_and_the_run_completes(tmp_path):
    proc = run_cli(
        *SMOKE, "trainer.max_epochs=500", "callbacks.finetune.max_epochs=0", "trainer.max_time=0.001",
        "margins.attack=false", f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = load(tmp_path)
    assert r["status"] == "completed" and r["metrics"]["stop_reason"] == "max_time"
    assert r["metrics"]["epochs"] < 500 and r["metrics"]["test_log_likelihood"] is not None
    assert r["metrics"]["convergence"]["converged"] is False
    # the log a user reads when the output is not a terminal (here: a pipe): no progress-bar
    # redraws, no third-party deprecation notes, a plain statement of convergence
    out = proc.stdout + proc.stderr
    assert "\x1b[A" not in out and "\r" not in out
    assert "deprecated" not in out and "Tip:" not in out
    assert "training stopped by trainer.max_time (the wall-clock budget)" in out and "NOT converged" in out


class _Scripted(L.LightningModule):
    """Logs the scripted validation and training losses, one pair per epoch (a parameter
    is trained so that Lightning runs its loops)."""

    def __init__(self, val, train=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.val, self.train_ = list(val), list(train or val)

    def training_step(self, batch, i):
        self.log("train/loss", self.train_[self.current_epoch], on_step=True, on_epoch=True)
        return (self.w**2).sum()

    def validation_step(self, batch, i):
        self.log("val/loss", self.val[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _phases(patience, finetune=None):
    """The phase-1 and phase-2 callbacks (early stopping, fine-tune) as conf/callbacks/ builds them,
    and a one-batch loader for the scripted module."""
    from omegaconf import OmegaConf

    from lipvae.build import build_entries

    cfg = composed("~callbacks.model_checkpoint", "~callbacks.last_checkpoint")
    OmegaConf.update(cfg, "callbacks.early_stopping.patience", patience)
    for k, v in (finetune or {"max_epochs": 0}).items():
        OmegaConf.update(cfg, f"callbacks.finetune.{k}", v)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), batch_size=2)
    return *build_entries(cfg, "callbacks"), loader


def _epochs(val, max_epochs, patience, finetune=None, train=None):
    """Trains the scripted module with the phase callbacks (the Trainer given phase 1's epochs
    and the fine-tune phase's, as a run gives it); returns the epochs trained, the recorded stop reason
    and the fine-tune callback."""
    from lipvae.training import stop_reason

    es, finetune, loader = _phases(patience, finetune)
    trainer = L.Trainer(max_epochs=max_epochs + finetune.max_epochs, callbacks=[es, finetune], logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(_Scripted(val, train), loader, loader)
    return trainer.current_epoch, stop_reason(es, finetune, trainer.current_epoch, trainer.max_epochs), finetune


def _ft(max_epochs, tol, patience):
    return {"max_epochs": max_epochs, "bjorck_iters": 50, "lr": 1e-5, "tol": tol, "patience": patience}


def test_schedule_records_why_it_stopped():
    assert _epochs([5, 4, 3, 3.5, 3.2, 3.1, 1], max_epochs=100, patience=3)[:2] == (6, "patience")
    assert _epochs([5, 4, 3, 2, 1], max_epochs=4, patience=3)[:2] == (4, "max_epochs")
    # fine-tune: after phase 1 (here its 1-epoch cap) the training loss must move by <= tol
    # for `patience` epochs in a row
    epochs, why, ft = _epochs([9] * 11, 1, 3, _ft(10, 1.0, 2), train=[9, 8, 5, 4.5, 4.2, 0, 0, 0, 0, 0, 0])
    assert (epochs, why, ft.phase) == (5, "finetune_converged", "done")
    assert _epochs([9] * 4, 1, 3, _ft(3, 0.1, 2), train=[9, 8, 5, 2])[:2] == (4, "finetune_max_epochs")
    # early stopping ends phase 1 early, and has no say in phase 2 (val/loss never improves there)
    assert _epochs([5, 4, 4, 4, 4, 4, 4, 4, 4], 50, 2, _ft(4, 0.0, 9))[:2] == (8, "finetune_max_epochs")
    assert FineTune(1, 1).stop_reason is None  # still running: none
    # off (max_epochs 0): phase 1 alone, no "phase" metric
    epochs, why, ft = _epochs([5, 4, 3, 3.5, 3.2, 3.1, 1], max_epochs=100, patience=3)
    assert (epochs, why, ft.active, ft.phase) == (6, "patience", False, "train")


@pytest.mark.parametrize("val,max_epochs,patience,finetune,expect", [
    ([5, 4, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0], 8, 2, None, (4, "patience")),  # early stopping
    ([9] * 11, 1, 3, _ft(10, 1e9, 1), (3, "finetune_converged")),  # the fine-tune phase, 8 epochs early
])
def test_a_resume_after_training_ended_trains_no_more(tmp_path, val, max_epochs, patience, finetune, expect):
    """A run that stopped before its epoch limit, interrupted after its last checkpoint (as when
    stopped while the margins of its best model were evaluated): resumed from that checkpoint, it
    trained on (one epoch after early stopping; to the limit after the fine-tune phase)."""
    from lipvae.lightning.callbacks import KeepStop, RunCheckpoint
    from lipvae.training import stop_reason

    def fit(ckpt_path=None):
        es, ft, loader = _phases(patience, finetune)
        ckpt = RunCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val/loss")
        last = RunCheckpoint(dirpath=str(tmp_path), filename="last", monitor=None, enable_version_counter=False)
        trainer = L.Trainer(max_epochs=max_epochs + ft.max_epochs, callbacks=[es, ckpt, last, ft, KeepStop()], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(_Scripted(val), loader, loader, ckpt_path=ckpt_path, weights_only=True)
        return trainer.current_epoch, stop_reason(es, ft, trainer.current_epoch, trainer.max_epochs)

    assert fit() == expect
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert fit(str(tmp_path / "last.ckpt")) == expect  # no epoch more, and the same reason
    assert last["epoch"] == expect[0] - 1  # last.ckpt: the end of training, not the best epoch
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == last["global_step"]


def test_a_time_budget_that_ends_the_last_epoch_is_still_the_stop_reason():
    """trainer.max_time stopping training within the only epoch was recorded as max_epochs (issue 27)."""
    from lipvae.lightning.callbacks import EpochHistory, time_is_up
    from lightning.pytorch.callbacks import EarlyStopping

    from lipvae.training import stop_reason

    module = _Scripted([3.0, 2.0])
    history = EpochHistory(echo=False)
    es = EarlyStopping(monitor="val/loss", patience=5, check_on_train_epoch_end=False)
    data = torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)
    trainer = L.Trainer(max_epochs=1, max_time={"seconds": 0}, callbacks=[es, history], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert trainer.global_step < 64  # stopped within the epoch
    assert time_is_up(trainer)
    assert stop_reason(es, None, max(trainer.current_epoch, 1), 1, timed_out=time_is_up(trainer)) == "max_time"
    assert stop_reason(es, None, 1, 1, timed_out=False) == "max_epochs"


@pytest.mark.parametrize(
    "losses,reason,evaluated,expect",
    [
        ([10.0, 8.0, 7.0, 6.5], "max_time", 4, dict(converged=False, improvement_last_epoch=0.5,
                                                    improvement_last_3_epochs=3.5, best_epoch_is_last=True)),
        ([10.0, 8.0, 8.5, 8.6, 8.7], "patience", 2, dict(converged=True, improvement_last_epoch=-0.1,
                                                         improvement_last_3_epochs=-0.7, best_epoch_is_last=False)),
        ([10.0], "max_epochs", 1, dict(converged=False, improvement_last_epoch=None,
                                       improvement_last_3_epochs=None, best_epoch_is_last=True)),
    ],
)
def test_convergence_is_read_from_the_validation_curve(losses, reason, evaluated, expect):
    from lipvae.logs import convergence, describe

    got = convergence(losses, reason, evaluated)
    assert got["val_losses"] == losses
    for key, value in expect.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    line = describe(got, reason, len(losses))
    assert ("NOT converged" in line) == (not expect["converged"])
    if expect["improvement_last_epoch"] is not None and not expect["converged"]:
        assert f"fell {expect['improvement_last_epoch']:.2f} nats in the last epoch" in line


def test_epoch_history_keeps_the_curve_and_the_epochs_seconds_across_a_resume(monkeypatch):
    """Each epoch's seconds run from its start to its validation's end; a resumed history goes on
    from the saved ones (results.json's timings.epochs_s is their sum)."""
    from types import SimpleNamespace

    import lipvae.lightning.callbacks as callbacks
    from lipvae.lightning.callbacks import EpochHistory

    clock = iter([0.0, 10.0, 12.5, 12.5, 30.0, 100.0, 104.0, 108.0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/loss": 5.0}, max_epochs=9, global_step=0)
    first = EpochHistory(echo=False)  # the clock's first reading
    for _ in range(2):  # epochs of 12.5 - 10 and 30 - 12.5 seconds
        first.on_train_epoch_start(trainer, None)
        first.on_validation_epoch_end(trainer, None)
    again = EpochHistory(echo=False)  # a resumed run's: 100.0
    again.load_state_dict(first.state_dict())
    trainer.callback_metrics = {"val/loss": 4.0}
    again.on_train_epoch_start(trainer, None)
    again.on_validation_epoch_end(trainer, None)  # 108 - 104 seconds
    assert again.val_losses == [5.0, 5.0, 4.0] and again.seconds == [2.5, 17.5, 4.0]


def test_a_copied_run_folder_resumes_with_its_own_best_checkpoint(tmp_path):
    """last.ckpt remembers best.ckpt by absolute path; a copy resumed elsewhere must evaluate its
    own best weights, not the original folder's, and keep the best score (issue 27)."""
    import shutil

    from lipvae.lightning.callbacks import RunCheckpoint

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), batch_size=2)

    def fit(folder, epochs, ckpt_path=None):
        ckpt = RunCheckpoint(dirpath=str(folder / "checkpoints"), filename="best", monitor="val/loss", save_top_k=1)
        last = RunCheckpoint(dirpath=str(folder / "checkpoints"), filename="last", monitor=None,
                             enable_version_counter=False)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[ckpt, last], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(folder))
        trainer.fit(_Scripted([3.0, 1.0, 2.0]), loader, loader, ckpt_path=ckpt_path, weights_only=True)
        return ckpt

    original, copy = tmp_path / "P", tmp_path / "Q"
    fit(original, 2)
    shutil.copytree(original, copy)
    ckpt = fit(copy, 3, ckpt_path=str(copy / "checkpoints" / "last.ckpt"))  # epoch 3 is worse than epoch 2
    assert Path(ckpt.best_model_path) == copy / "checkpoints" / "best.ckpt"
    assert float(ckpt.best_model_score) == 1.0
    best = torch.load(copy / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 1  # the copy's best.ckpt is still epoch 2's, not overwritten by epoch 3


def test_a_resume_drops_the_metric_rows_logged_after_the_checkpoint(tmp_path):
    """After a kill and resume, the killed epoch's step rows appeared twice in csv/metrics.csv."""
    from lipvae.training import trim_metrics

    path = tmp_path / "metrics.csv"
    pd.DataFrame({"epoch": [0, 0, 0, 1, 1], "step": [9, 19, 21, 29, 39],
                  "train/loss_step": [5.0, 4.0, None, 3.0, 2.0], "val/loss": [None, None, 4.5, None, None]}
                 ).to_csv(path, index=False)
    trim_metrics(path, resumed_step=22)  # the checkpoint was taken after step 21 (end of epoch 0)
    kept = pd.read_csv(path)
    assert kept["step"].tolist() == [9, 19, 21] and kept["val/loss"].iloc[-1] == 4.5
    trim_metrics(tmp_path / "absent.csv", 5)  # nothing to trim


@pytest.mark.slow
def test_train_runs_in_process_without_hydra(tmp_path, monkeypatch, synthetic_root):
    """train(cfg, ctx) needs a composed config and a folder, nothing of Hydra's global state."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lipvae.training import RunContext, train

    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    with initialize_config_module(version_base="1.3", config_module="lipvae.conf"):
        cfg = compose("config", overrides=["tier=smoke", "data.resplit=true", "margins.attacked_inputs=3"])
    assert not GlobalHydra.instance().is_initialized() and not HydraConfig.initialized()
    ctx = RunContext(tmp_path / "run", command="my notebook", overrides=["margins.attacked_inputs=3"])
    results = train(cfg, ctx)
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["status"] == "completed" and stored["soundness_violations"] == 0
    assert stored["run"]["command"] == "my notebook" and stored["run"]["overrides"] == ["margins.attacked_inputs=3"]
    assert stored["metrics"]["test_elbo"] == pytest.approx(results.metrics["test_elbo"])  # a typed Results
    assert stored["estimated"]["num_inputs"] == 3 and (tmp_path / "run" / "frozen_model.pt").is_file()
    # the margins were evaluated in memory: no evaluation.json written (nor read back), the tables there
    assert not (tmp_path / "run" / "evaluation.json").exists()
    margins = pd.read_csv(tmp_path / "run" / "margins.csv")
    assert margins["estimated"].mean() == pytest.approx(stored["estimated"]["mean"])


@pytest.mark.slow
def test_a_run_without_the_attack_is_certified_only(tmp_path, synthetic_root, monkeypatch):
    """margins.attack=false: the certificates alone (no attack, so no soundness check); a stale
    evaluation.json of an earlier attempt in the folder is not taken for this run's."""
    from lipvae.training import RunContext, train

    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    (tmp_path / "evaluation.json").write_text('{"estimated": {"mean": 99.0}}')
    results = train(composed("tier=smoke", "data.resplit=true", "margins.attack=false"), RunContext(tmp_path))
    assert results.estimated is None and results.soundness_violations is None
    assert results.certified["num_inputs"] == 120 and results.certified["mean"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["estimated"] is None


@pytest.mark.slow  # reads the session's smoke runs
def test_a_run_is_composed_once_and_validated_once(smoke_runs, tmp_path, monkeypatch):
    """``python -m lipvae.train`` composes its config only in Hydra (no composition of its own to
    check the command line first) and checks it once (before Hydra makes the folder, not again in the
    job or in ``run``): counted on a resume of a completed run, which ends after the checks."""
    import shutil

    from hydra._internal.hydra import Hydra

    import lipvae.compose as compose
    import lipvae.config as config

    run = shutil.copytree(smoke_runs[("lipschitz", "learned")], tmp_path / "run")
    counts = {"hydra": 0, "lipvae": 0, "validate": 0}
    hydra_compose, lipvae_compose, check_node = Hydra.compose_config, compose.hydra_compose, config.check_node

    def composed_by_hydra(self, *args, **kwargs):
        counts["hydra"] += 1
        return hydra_compose(self, *args, **kwargs)

    def composed_by_lipvae(*args, **kwargs):
        counts["lipvae"] += 1
        return lipvae_compose(*args, **kwargs)

    def checked(node, schema, prefix=""):
        counts["validate"] += prefix == ""  # once per validate(): the root's fields first
        return check_node(node, schema, prefix)

    monkeypatch.setattr(Hydra, "compose_config", composed_by_hydra)
    monkeypatch.setattr(compose, "hydra_compose", composed_by_lipvae)
    monkeypatch.setattr(config, "check_node", checked)
    proc = run_cli(*SMOKE, "model=lipschitz", "model.encoder_std.mode=learned", f"hydra.run.dir={run}", "resume=true")
    assert proc.returncode == 0 and "is already completed; nothing to resume" in proc.stderr, proc.stderr[-2000:]
    # Hydra's app composes twice itself (its get_mode, then its run: hydra/_internal/utils.py); lipvae adds none
    assert counts["lipvae"] == 0 and counts["validate"] == 1 and counts["hydra"] <= 2, counts
