"""Bad input, faults and security (issue: reliability)."""

import json
import re
import os
import signal
import time
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from conftest import SMOKE, composed, every_kth_fast, run_cli, run_main, start_cli
from lipvae.build import build_entries
from lipvae.compose import check_overrides
from lipvae.config import validate
from lipvae.data import find_split
from lipvae.errors import UserError
from lipvae.lightning.module import NonFiniteLossError, VAEModule
from lipvae.lightning.callbacks import SaveOnException
from lipvae.results import Results
from lipvae.vae import VAE

BAD_INPUTS = [
    (["enc_L=0"], "enc_L: got 0; accepted: a positive number"),
    (["enc_L=abc"], "enc_L: got 'abc'; accepted: a positive number"),
    (["dec_L=-2"], "dec_L: got -2; accepted: a positive number"),
    (["model.lipschitz.decoder=0"], "model.lipschitz.decoder: got 0; accepted: a positive number"),
    (["model.kind=wild"], "model.kind: got 'wild'; accepted: lipschitz, standard"),
    (["certify.r=[0]"], "certify.r: got [0]; accepted: a list of numbers > 0"),
    (["certify.p=[1.5]"], "certify.p: got [1.5]; accepted: a list of numbers in (0, 1)"),
    (["model.latent_dim=0"], "model.latent_dim: got 0; accepted: a positive integer"),
    (["model.latent_dim=1"], "model.latent_dim: got 1; accepted: an integer >= 2 when certifying"),
    (["model.hidden=[31,32]"], "model.hidden: got [31, 32]; accepted: even widths (GroupSort groups of 2)"),
    (["model.encoder_std.mode=wild"], "model.encoder_std.mode: got 'wild'; accepted: learned, bounded, fixed"),
    (["model.likelihood=poisson"], "model.likelihood: got 'poisson'; accepted: continuous_bernoulli, bernoulli, gaussian"),
    (["data.name=cifar"], "data.name: got 'cifar'; accepted: mnist, fashion_mnist"),
    (["certify.forms=[loose]"], "certify.forms: got ['loose']; accepted: a list drawn from paper, exact, tight, cantelli, coupled"),
    (["certify.forms=[tight,coupled]", "certify.coupled.alpha=0.7"],
     "certify.coupled.alpha: got 0.7; accepted: a number in (0, 0.5]"),
    (["certify.forms=[coupled]", "certify.coupled.samples=10"],
     "certify.coupled.samples: got 10; accepted: an integer >= 100"),
    (["model.encoder_std.mode=fixed", "model.encoder_std.gamma=0"], "model.encoder_std.gamma: got 0; accepted"),
    (["model.encoder_std.mode=bounded"], "model.encoder_std.max_norm: got None; accepted: a positive number"),
    (["model.encoder_std.mode=bounded", "model.encoder_std.max_norm=-1"], "model.encoder_std.max_norm: got -1"),
    (["model.beta=-1"], "model.beta: got -1; accepted: a number >= 0"),
    (["data.limit=0"], "data.limit: got 0; accepted: a positive integer or null"),
    (["margins.attacked_inputs=0"], "margins.attacked_inputs: got 0; accepted: a positive integer"),
    (["attack.p=0"], "attack.p: got 0; accepted: a number in (0, 1)"),
    (["attack.search=random"], "attack.search: got 'random'; accepted: bisection, grid"),
    (["data.resplit=maybe"], "data.resplit: got 'maybe'; accepted: true, false, auto"),
    (["name=x/../../escaped"], "name: got 'x/../../escaped'; accepted: letters, digits"),
    (["name=.."], "name: got '..'; accepted: letters, digits"),
    (["seed=abc"], "seed: got 'abc'; accepted: an integer in [0, 2^32)"),
    (["seed=-1"], "seed: got -1; accepted: an integer in [0, 2^32)"),
    (["resume=maybe"], "resume: got 'maybe'; accepted: true, false, auto"),
    (["data.val_fraction=abc"], "data.val_fraction: got 'abc'; accepted: a number in (0, 1)"),
    (["data.resplit_test_fraction=1.5"], "data.resplit_test_fraction: got 1.5; accepted: a number in (0, 1)"),
    (["data.eval_batch_size=0"], "data.eval_batch_size: got 0; accepted: a positive integer"),
    (["module.num_importance=-1"], "module.num_importance: got -1; accepted: an integer >= 0"),
    (["module.lr=0"], "module.lr: got 0; accepted: a positive number"),
    (["callbacks.early_stopping.patience=0"], "callbacks.early_stopping.patience: got 0; accepted: a positive integer"),
    (["callbacks.finetune.max_epochs=-1"], "callbacks.finetune.max_epochs: got -1; accepted: an integer >= 0"),
    (["+callbacks.finetune.colour=red"], "callbacks.finetune.colour: no such field"),
    (["trainer.max_epochs=0"], "trainer.max_epochs: got 0; accepted: a positive integer"),
    (["model.lr=1e-3"], "model.lr: no such field; no field of that name"),
    (["attack.max_radius=inf"], "attack.max_radius: got inf; accepted: a positive number"),
    (["trainer.precision=foo"], "trainer.precision: got 'foo'; accepted: 32-true, 32, 64-true, 64"),
    (["trainer.precision=bf16-mixed"], "trainer.precision: got 'bf16-mixed'; accepted: 32-true"),
    (["trainer.accelerator=tpu"], "trainer.accelerator: got 'tpu'; accepted: auto, cpu, gpu, cuda, mps"),
    (["logger.wandb.mode=foo"], "logger.wandb.mode: got 'foo'; accepted: offline, online"),
    (["model.hidden=[true,true]"], "model.hidden: got [True, True]; accepted: a non-empty list of positive integers"),
    (["trainer.max_time=0"], "trainer.max_time: got 0; accepted: minutes > 0, or null"),
    (["trainer.max_time=inf"], "trainer.max_time: got inf; accepted: minutes > 0, or null"),
    (["trainer.max_time=soon"], "trainer.max_time: got 'soon'; accepted: minutes > 0, or null"),
    (["trainer.accelerator=cpu", "trainer.devices=2"], "trainer.devices: got 2 on CPU; accepted: 1, or several with a strategy"),
    (["trainer.strategy=dpp"], "trainer.strategy: got 'dpp'; accepted: auto or a Lightning strategy name"),
    (["trainer.strategy=ddp_spawn"], "trainer.strategy: got 'ddp_spawn'; accepted: auto or a Lightning strategy name"
                                     " that runs this command on every device (ddp, fsdp, ...; not ddp_spawn"),
    (["trainer.devices=0"], "trainer.devices: got 0; accepted: a positive integer, -1 or auto"),
    (["evaluate=first"], "evaluate: got 'first'; accepted: best, last"),
    (["attack=cw"], "attack: got 'cw'; accepted: lbfgs, pgd, pgd_cold, pgd_quick, pgd_smoke"),
    (["attack._target_=collections.OrderedDict"],
     "attack._target_: got 'collections.OrderedDict'; accepted: a subclass of lipvae.attack.MarginAttack"),
    (["attack._target_=no.such.Attack"], "attack: cannot build no.such.Attack ("),
    (["attack=lbfgs", "attack.lbfgs.maxcor=0"], "attack.lbfgs.maxcor: got 0; accepted: a positive integer"),
    (["attack=lbfgs", "attack.steps=5"],  # L-BFGS-B takes no steps
     "attack.steps: no such field of LBFGSAttack, which takes none of pgd's compile, search, steps, tol, warm_steps"),
    (["attack=lbfgs", "attack.lbfgs.pgtol=-1"], "attack.lbfgs.pgtol: got -1; accepted: a positive number"),
    (["margins.latent.kind=medium"], "margins.latent.kind: got 'medium'; accepted: hard, soft"),
    (["margins/latent=soft", "margins.latent.penalty=-1"], "margins.latent.penalty: got -1; accepted: a number >= 0"),
    (["margins/latent=soft", "margins.latent.lr=0"], "margins.latent.lr: got 0; accepted: a positive number"),
    (["model.layer=cayley"], "model.layer: got 'cayley'; accepted: a mapping with _target_"),
    (["model/layer=cayley"], "model/layer: got 'cayley'; accepted: aol, bjorck, stiefel, torchlip"),
    (["model.layer._target_=torch.nn.Linear"],
     "model.layer._target_: got 'torch.nn.Linear'; accepted: a subclass of lipvae.networks.LipschitzLinear"),
    (["model.layer._target_=no.such.Layer"], "model.layer: cannot build no.such.Layer ("),
    (["+model.layer.colour=red"], "model.layer: cannot build lipvae.networks.StiefelLinear (TypeError"),
    (["logger.wandb._target_=collections.OrderedDict"],
     "logger.wandb._target_: got 'collections.OrderedDict'; accepted: a lightning.pytorch Logger class"),
    (["data.root=/nonexistent/lipvae"], "data.root: got '/nonexistent/lipvae'; accepted: an existing folder holding"),
    (["name=x/../../../elsewhere/run"], "name: got 'x/../../../elsewhere/run'; accepted: letters, digits and . _ = + , -"),
    ([f"name={'a' * 201}"], f"name: got '{'a' * 201}'; accepted: letters, digits and . _ = + , -, at most 200"),
    (["attack.max_radius=1e300"], "attack.max_radius: got 1e+300; accepted: a positive number up to 1e6"),
    (["attack.samples=100000000000"], "attack.samples, attack.starts: got 100000000000 and 5 for 25 inputs, which need at"),
    (["model/layer=stiefel", "trainer.precision=64-true"],
     "trainer.precision: got '64-true'; accepted: 32-true with model/layer=stiefel"),
    (["model/arch=conv", "model.arch.channels=[3]"], "model.arch.channels: got [3]; accepted: a non-empty list of positive even"),
    (["model/arch=conv", "model.arch.kernel_size=2"], "model.arch.kernel_size: got 2; accepted: a positive odd integer"),
    (["model/arch=dense"], "model/arch: got 'dense'; accepted: conv, mlp"),
    (["attack.search=grid", "attack.grid_step=1e-4"],
     "attack.grid_step: got 0.0001; accepted: at least attack.max_radius/1000 = 0.01 (at most 1000 radii"),
]


@pytest.mark.parametrize("overrides,message", every_kth_fast(BAD_INPUTS, 10, ids=[" ".join(o) for o, _ in BAD_INPUTS]))
def test_bad_input_names_field_value_and_accepted(overrides, message):
    with pytest.raises(UserError) as err:
        validate(check_overrides(list(overrides)))  # types at composition, constraints in validate
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_defaults_and_presets_are_valid():
    validate(composed())
    validate(composed("model=standard", "model.encoder_std.mode=fixed"))
    validate(composed("tier=smoke", "model.encoder_std.mode=bounded", "model.encoder_std.max_norm=0.5"))
    lbfgs = composed("attack=lbfgs", "margins/latent=soft")
    validate(lbfgs)
    assert (lbfgs.attack._target_, lbfgs.attack.lbfgs.maxcor) == ("lipvae.attack.LBFGSAttack", 100)
    pgd_only = {"steps", "tol", "search", "warm_steps", "compile"}  # LBFGSAttack takes none of them
    assert not pgd_only & set(lbfgs.attack) and pgd_only <= set(composed().attack)
    assert lbfgs.margins.latent.kind == "soft" and lbfgs.margins.latent.penalty == 1.0
    assert composed().attack._target_ == "lipvae.attack.PGDAttack" and composed().margins.latent.kind == "hard"


@pytest.mark.slow
def test_presets_combine_with_the_reference_attack():
    """The presets' pgd settings are pgd options (attack/pgd_smoke, pgd_quick, pgd_cold), which
    attack=lbfgs replaces; the sizes they set for any attack stay."""
    pgd_only = {"steps", "tol", "search", "warm_steps", "compile"}
    for preset in (["tier=smoke"], ["tier=quick"], ["experiment=fig5", "tier=official"]):
        both = composed(*preset, "attack=lbfgs")
        validate(both)
        assert not pgd_only & set(both.attack)
        assert both.margins.attacked_inputs == composed(*preset).margins.attacked_inputs
    assert (composed("tier=smoke").attack.steps, composed("experiment=fig5", "tier=official").attack.warm_steps) == (20, 0)


@pytest.mark.parametrize(
    "args,fragment",
    every_kth_fast([
        (["model.hidden=[31,32]"], "error: model.hidden: got [31, 32]; accepted: even widths"),
        (["certify.p=[2]"], "error: certify.p: got [2]; accepted"),
    ], 2),
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, fragment):
    proc = run_cli(*SMOKE, *args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(fragment)
    assert "Traceback" not in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before the run folder was written


def test_a_bad_sweep_callback_setting_is_one_line_before_any_job(tmp_path):
    """lipvae's Hydra callbacks are built by Hydra: a value they refuse is the same one line."""
    proc = run_cli(*SMOKE, "hydra.callbacks.sweep_summary.report=maybe", f"hydra.sweep.dir={tmp_path / 's'}", "-m")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: hydra.callbacks.sweep_summary.report: got 'maybe'; accepted: true, false")
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()


def test_a_run_name_that_leaves_outputs_writes_nothing(tmp_path):
    """name=x/../../.. was refused only after .hydra/, results.json and train.log were written at
    the escaped path (issue 27)."""
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli(*SMOKE, "name=x/../../../../../escaped", cwd=work)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: name: got 'x/../../../../../escaped'; accepted: letters, digits and . _ = + , -, at most 200 (no path"
        " separators or '..': run folders stay under outputs/)"]
    assert [p for p in tmp_path.rglob("*") if p != work] == []


@pytest.mark.parametrize(
    "argv,message",
    every_kth_fast([
        (["model.lattent_dim=3"], "model.lattent_dim: no such field; did you mean model.latent_dim?"),
        (["model=standard", "enc_l=5"], "enc_l: no such field; did you mean enc_L?"),
        (["-m", "data.limitt=4,8"], "data.limitt: no such field; did you mean data.limit?"),
        (["model=lipshitz"], "model: got 'lipshitz'; accepted: lipschitz, standard"),
        (["experiment=fig55"], "experiment: got 'fig55'; accepted: fig3, fig4, fig5, fig5_seeds, fig5_standard, fig6_7"),
        (["model.hidden=[1"], "model.hidden=[1: cannot be read as an override"),
        (["certify.zzz=1"], "certify.zzz: no such field; no field of that name"),
    ], 3),
)
def test_mistyped_override_is_one_line_naming_the_closest_field(argv, message):
    with pytest.raises(UserError) as err:
        check_overrides(argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.slow  # composes six configs
def test_only_an_open_node_is_offered_a_new_field():
    """`+key=` is suggested where the schema leaves the node open (logger, callbacks, a layer's own
    arguments), never for a schema class's field, where `+` would fail too."""
    with pytest.raises(UserError) as closed:
        check_overrides(["model.lattent_dim=3"])
    assert "+model" not in str(closed.value)
    with pytest.raises(UserError) as open_:
        check_overrides(["logger.tb=1"])
    assert str(open_.value).endswith("(to add a new field, write +logger.tb=...)")
    check_overrides(["+logger.tb._target_=lightning.pytorch.loggers.CSVLogger"])  # and it works
    # a schema class's node takes no field of the user's (the VAE would ignore it)
    for argv, message in ((["+model.lattent_dim=3"], "model.lattent_dim: no such field; did you mean model.latent_dim?"),
                          (["+attack.stepz=3"], "attack.stepz: no such field; did you mean attack.steps?"),
                          (["attack=lbfgs", "+attack.steps=3"], "attack.steps: no such field")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            validate(check_overrides(argv), machine=False)  # the unused-field check is part of validate

def test_callbacks_group_builds_lightning_callbacks():
    """Each entry of the callbacks group is its object, with the entry's fields as arguments."""
    from lightning.pytorch.callbacks import DeviceStatsMonitor, EarlyStopping, LearningRateMonitor

    from lipvae.lightning.callbacks import FineTune, RunCheckpoint

    es, ckpt, last, finetune = build_entries(composed(  # the margins are not callbacks of a run: train() evaluates
        "callbacks.early_stopping.patience=7", "callbacks.finetune.max_epochs=3", "certify.r=[4.0,8.0]",
        "attack.steps=7", "evaluate=last", "seed=3"), "callbacks")
    assert (type(es), type(ckpt), type(finetune)) == (EarlyStopping, RunCheckpoint, FineTune)
    assert (es.patience, es.monitor, es._check_on_train_epoch_end) == (7, "val/loss", False)
    assert (ckpt.monitor, ckpt.save_last, ckpt.save_top_k, ckpt.filename) == ("val/loss", None, 1, "best")
    assert (type(last), last.monitor, last.save_top_k, last.filename) == (RunCheckpoint, None, 1, "last")
    assert (finetune.max_epochs, finetune.bjorck_iters, finetune.lr) == (3, 50, 1e-5)
    built = build_entries(composed("callbacks=monitors", "~callbacks.finetune"), "callbacks")
    assert [type(c) for c in built] == [EarlyStopping, RunCheckpoint, RunCheckpoint, LearningRateMonitor,
                                        DeviceStatsMonitor]
    assert built[3].logging_interval == "epoch"


@pytest.mark.parametrize(
    "overrides,message",
    every_kth_fast([
        (["+callbacks.x=3"], "callbacks.x: got 3; accepted: a mapping with _target_"),
        (["+callbacks.x._target_=no.such.Class"], "callbacks.x: cannot build no.such.Class ("),
        (["+callbacks.x._target_=lightning.pytorch.callbacks.EarlyStopping"],
         "callbacks.x: cannot build lightning.pytorch.callbacks.EarlyStopping (TypeError: "),
        (["+callbacks.x._target_=collections.OrderedDict"],
         "callbacks.x._target_: got 'collections.OrderedDict'; accepted: a lightning.pytorch Callback class"),
    ], 2),
)
def test_bad_callback_entry_is_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        build_entries(composed(*overrides), "callbacks")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.slow  # builds Lightning loggers
def test_loggers_are_built_in_the_run_folder(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lipvae.lightning.loggers import AppendingCSVLogger
    from lipvae.training import RunContext, build_loggers

    ctx = RunContext(tmp_path, group="sweep_1")
    csv, wandb = build_loggers(composed("logger.wandb.project=p"), ctx)
    assert isinstance(csv, AppendingCSVLogger) and Path(csv.log_dir) == tmp_path / "csv"
    assert isinstance(wandb, WandbLogger) and wandb.save_dir == str(tmp_path)
    assert (wandb._wandb_init["project"], wandb._wandb_init["group"], wandb._wandb_init["mode"]) == ("p", "sweep_1", "offline")
    assert [type(lg) for lg in build_loggers(composed("logger=csv"), ctx)] == [AppendingCSVLogger]
    _, extra = build_loggers(composed("logger=csv", "+logger.a._target_=lightning.pytorch.loggers.CSVLogger"), ctx)
    assert type(extra) is CSVLogger and extra.save_dir == str(tmp_path)
    with pytest.raises(UserError, match=r"^logger.a._target_: got 'lightning.pytorch.callbacks.EarlyStopping'; accepted: a lightning"):
        build_loggers(composed("+logger.a._target_=lightning.pytorch.callbacks.EarlyStopping"), ctx)
    with pytest.raises(UserError, match=r"^logger.a._target_: got 'collections.OrderedDict'; accepted: a lightning"):
        build_loggers(composed("+logger.a._target_=collections.OrderedDict"), ctx)


def test_wandb_online_without_an_api_key_is_one_line_before_any_data(tmp_path, monkeypatch, capsys):
    """W&B online with no key anywhere (not in the environment, not in ~/.netrc) and no terminal
    to ask in: one line from the logger's construction, not W&B's traceback after the data."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    proc = run_main(*SMOKE, "logger=default", f"hydra.run.dir={tmp_path / 'run'}", env={"WANDB_MODE": "online"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: logger.wandb.mode: online (logger.wandb.mode or WANDB_MODE), but W&B says: No API"
                           " key configured") and line.endswith("offline (wandb sync uploads later) or logger=csv")
    assert "Traceback" not in proc.stderr and "data: {" not in (tmp_path / "run" / "train.log").read_text()


def test_valid_overrides_and_sweeps_pass_the_check():
    """A sweep is checked at its first value: the composed config is that job's."""
    cfg = check_overrides(["-m", "model=lipschitz", "enc_L=5,7,10", "tier=smoke", "hydra/launcher=joblib",
                           "hydra.sweep.dir=/tmp/x", "+extra=1", "seed=range(1,3)"])
    assert (cfg.enc_L, cfg.seed, cfg.extra, cfg.data.limit) == (5.0, 1, 1, 600)


def test_cli_mistyped_key_exits_2_with_one_line(tmp_path):
    proc = run_cli("model.lattent_dim=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: model.lattent_dim: no such field; did you mean model.latent_dim?"
    ]
    assert not any(tmp_path.iterdir())  # refused before any run folder was written


@pytest.mark.slow
def test_cli_missing_and_corrupt_dataset(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    if find_split("fashion_mnist", "test", None) is None:  # only MNIST is beside the project
        proc = run_cli(
            *SMOKE, "data=fashion_mnist", "data.download=false", f"hydra.run.dir={tmp_path / 'a'}",
            env={"LIPVAE_DATA_DIR": str(empty)},
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: data: fashion_mnist test split not found (looked in ")
        assert str(empty / "fashion_mnist") in last and "apt-get install dataset-fashion-mnist" in last
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01" * 5)
    proc = run_cli(*SMOKE, f"data.root={bad}", "data.download=false", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 2
    assert "is corrupt" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr


@pytest.mark.slow  # runs the CLI in-process
def test_cli_unreadable_checkpoint_on_resume(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    proc = run_cli(*SMOKE, "resume=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint: cannot load")


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    Results.from_dict({"status": "completed", "n": 1}).write(tmp_path)
    before = (tmp_path / "results.json").read_text()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        Results.from_dict({"status": "completed", "n": 2}).write(tmp_path)
    assert (tmp_path / "results.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_nan_loss_stops_with_message_and_finite_checkpoint(tmp_path):
    x = torch.rand(64, 20)
    x[40] = float("nan")  # the third batch of 16 is poisoned
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)
    module = VAEModule(VAE(input_dim=20, latent_dim=2, hidden=(8, 8)), lr=1e-3, num_importance=0)
    saver = SaveOnException(dirpath=str(tmp_path), filename="last")
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[saver])
    with pytest.raises(NonFiniteLossError, match="training loss became nan at epoch 0, step 2"):
        trainer.fit(module, train_dataloaders=loader)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_kill_then_resume_finishes_the_run(tmp_path):
    """SIGTERM mid-training (SIGINT, which one handler serves alike, is test_runs' sweep-job test)."""
    args = [
        *SMOKE, "margins.attack=false", "model.hidden=[256,256]",
        "trainer.max_epochs=4", "callbacks.early_stopping.patience=100", f"hydra.run.dir={tmp_path}",
    ]
    proc = start_cli(*args)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    failed = json.loads((tmp_path / "results.json").read_text())
    assert failed["status"] == "interrupted" and "resume=true" in failed["error"]
    assert (tmp_path / ".lipvae.lock").read_text() == ""  # a stop is not a kill: the folder is handed back
    stopped_at = torch.load(last, weights_only=True)["epoch"]
    assert stopped_at < 4
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*.tmp"))
    metrics = tmp_path / "csv" / "metrics.csv"
    header = pd.read_csv(metrics, nrows=0).columns  # whole after the stop, never half-rewritten
    assert "val/loss" in header and "train/loss_step" in header, list(header)
    before = set(pd.read_csv(metrics).dropna(subset=["val/loss"])["epoch"].astype(int))
    assert before, "no validation row before the stop, yet last.ckpt (written after one) existed"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        done = run_cli(*args, "resume=true")
    assert done.returncode == 0, done.stderr[-2000:]
    # neither the run's own checkpoint folder nor its loader (it resumes mid-epoch) is something to act on
    noise = ("exists and is not empty", "dataloader is not resumable")
    assert not [w for w in shown if any(n in str(w.message) for n in noise)], [str(w.message) for w in shown]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "completed" and r["metrics"]["epochs"] == 5  # 4 + 1 fine-tune epoch
    assert r["certified"]["fraction_certified"] == 1.0
    # the curves from before the stop are kept and every epoch, the one in flight included,
    # has its validation row
    val = pd.read_csv(tmp_path / "csv" / "metrics.csv").dropna(subset=["val/loss"])
    assert before <= set(val["epoch"].astype(int)) and set(range(5)) <= set(val["epoch"].astype(int))


#: a run's config as lipvae recorded it before each group was one object (trimmed to what moved)
def test_a_run_recorded_by_another_version_is_refused_in_one_line(tmp_path):
    """No migration: a run whose record has another version is refused before anything
    is read from it, naming the versions and the code that recorded it; the report still reads
    its numbers (results.json's numbers are the same in versions 1 and 2)."""
    import json

    from lipvae.results import SCHEMA_VERSION
    from lipvae.runfolder import RunFolderError, check_run_folder
    from lipvae.stored import load_model

    run = tmp_path / "old"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: {lr: 0.001}\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not read")
    record = {"schema_version": 1, "status": "interrupted", "run": {"code": "abc1234"}, "metrics": {"test_elbo": -90.0}}
    (run / "results.json").write_text(json.dumps(record))
    message = (f"run: {run} was recorded with record version 1 and this lipvae reads version {SCHEMA_VERSION}; to"
               " {} it, use the lipvae that recorded it (code abc1234), or train the run again")
    with pytest.raises(UserError, match=f"^{re.escape(message.format('evaluate'))}$"):
        load_model(run)
    with pytest.raises(RunFolderError, match=f"^{re.escape(message.format('resume'))}$"):
        check_run_folder(composed("resume=true"), run)
    for version in (record.pop("schema_version"), SCHEMA_VERSION):  # none (a foreign file: left to later checks), today's
        (run / "results.json").write_text(json.dumps({**record, "schema_version": version} if version == SCHEMA_VERSION
                                                     else record))
        with pytest.raises(UserError, match="frozen_model.pt is missing"):
            load_model(run)
    record.update(schema_version=SCHEMA_VERSION)  # today's: on to the next check (here: no frozen model)
    (run / "results.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="frozen_model.pt is missing"):
        load_model(run)


@pytest.mark.parametrize("args, fragment", [
    (["--config-dir", "/nonexistent/lipvae-conf"],
     "error: --config-dir: got '/nonexistent/lipvae-conf'; accepted: an existing folder of config groups"),
    ([f"hydra.run.dir=/tmp/{'b' * 300}"], "error: hydra.run.dir: got a folder name of 300 bytes; accepted: folder names"),
])
def test_command_line_folders_that_cannot_be_are_one_line(args, fragment):
    proc = run_cli(*args, *SMOKE)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.strip().startswith(fragment)


@pytest.mark.slow
def test_a_non_finite_stored_weight_is_one_line(smoke_runs, tmp_path, capsys, monkeypatch, synthetic_root):
    import shutil

    import torch

    from lipvae.evaluate import main as evaluate_main

    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    run = shutil.copytree(smoke_runs[("lipschitz", "learned")], tmp_path / "run")
    state = torch.load(run / "frozen_model.pt", weights_only=True)
    state["decoder.0.weight"][0, 0] = float("nan")
    torch.save(state, run / "frozen_model.pt")
    assert evaluate_main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint: ") and "non-finite weights (decoder.0.weight)" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["stiefel", "bjorck"])
def test_a_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path, layer):
    """SIGKILL after the first checkpoint (Stiefel layers: optimiser state, random streams and
    batch order all restored), then resume=auto: every recorded number equals the uninterrupted
    run's, and results.json says where it resumed from."""
    args = [*SMOKE, f"model/layer={layer}", "trainer.max_epochs=3", "callbacks.early_stopping.patience=100",
            "callbacks.finetune.max_epochs=0", "margins.attacked_inputs=2", "attack.steps=5"]
    whole = run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}", process=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = start_cli(*args, f"hydra.run.dir={killed}")
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    resumed = run_cli(*args, f"hydra.run.dir={killed}", "resume=auto", process=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "killed"))
    assert a["run"]["resumed_from"] is None and b["run"]["resumed_from"]["epoch"] in (0, 1, 2)
    for part in ("certified", "estimated", "lipschitz", "latent_attack", "data"):
        assert a[part] == b[part], part
    assert {k: v for k, v in a["metrics"].items()} == {k: v for k, v in b["metrics"].items()}
    rows = pd.read_csv(killed / "csv" / "metrics.csv")
    steps = rows.dropna(subset=["train/loss_step"])["step"] if "train/loss_step" in rows else rows["step"]
    assert not steps.duplicated().any()  # no step logged twice


@pytest.mark.slow
@pytest.mark.parametrize("layer,when", [("stiefel", "step"), ("bjorck", "fit_end")])
def test_a_run_stopped_in_the_middle_of_a_step_and_resumed_equals_the_uninterrupted_one(tmp_path, layer, when):
    """SIGTERM in the middle of a training step (after the backward pass, before the optimiser's
    step) in the second epoch: the step finishes, the stop takes effect at the step boundary, and
    resume=auto re-draws the epoch's batch order and goes on with the next batch. Or SIGTERM when
    fitting ends, after the margins' evaluation: the resume evaluates again. Either way every
    recorded number (orthonormality_error_before_freeze included) equals the uninterrupted run's."""
    args = [*SMOKE, f"model/layer={layer}", "trainer.max_epochs=2", "callbacks.early_stopping.patience=100",
            "callbacks.finetune.max_epochs=0", "margins.attacked_inputs=2", "attack.steps=5", "data.batch_size=32",
            "+callbacks.signal._target_=signal_at_step.SignalAtStep"]
    tests = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    whole = run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}", process=True, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    stop_at = 23  # in the second epoch (17 batches of 32 per epoch), not at its start
    signal_env = {"LIPVAE_TEST_SIGNAL_AT_STEP": str(stop_at)} if when == "step" else {"LIPVAE_TEST_SIGNAL_AT_FIT_END": "1"}
    stopped = run_cli(*args, f"hydra.run.dir={tmp_path / 'killed'}", process=True, env={**env, **signal_env})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    resumed = run_cli(*args, f"hydra.run.dir={tmp_path / 'killed'}", "resume=auto", process=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    where = {"epoch": 1, "step": stop_at + 1} if when == "step" else {"epoch": 2}
    assert b["run"]["resumed_from"] == {**b["run"]["resumed_from"], **where}
    for part in ("certified", "estimated", "lipschitz", "latent_attack", "data"):
        assert a[part] == b[part], part
    assert a["metrics"] == b["metrics"]


@pytest.mark.slow
def test_a_killed_joblib_sweep_leaves_no_worker_and_resumes(tmp_path):
    """SIGKILL the launching process of a two-job joblib sweep while both jobs train: each worker
    stops its job (checkpoint, run recorded as interrupted) and exits, releasing the job's folder;
    the same sweep with resume=auto then continues both from their checkpoints and completes."""
    sweep = tmp_path / "sweep"
    args = [*SMOKE, "enc_L=5,6", "trainer.max_epochs=8", "callbacks.early_stopping.patience=100",
            "callbacks.finetune.max_epochs=0", "data.batch_size=8", "margins.attacked_inputs=2", "attack.steps=5",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "-m"]
    launcher = start_cli(*args)
    deadline = time.time() + 240
    while len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2 and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    assert launcher.poll() is None, "the sweep ended before it could be killed"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    workers = [int((run / ".lipvae.lock").read_text()) for run in runs]
    assert len(runs) == 2 and launcher.pid not in workers
    launcher.send_signal(signal.SIGKILL)
    launcher.communicate(timeout=60)
    deadline = time.time() + 120

    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "a worker outlived its sweep"
    for run in runs:
        record = json.loads((run / "results.json").read_text())
        assert record["status"] == "interrupted", record.get("error")
    # the same sweep resumed, as a user would: a new interpreter (loky's idle workers would keep
    # the output of a launcher forked from the test's server open)
    import subprocess
    import sys

    from conftest import _process_env

    resumed = subprocess.run([sys.executable, "-m", "lipvae.train", *args, "resume=auto"], capture_output=True,
                             text=True, env=_process_env(None), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in runs:
        r = json.loads((run / "results.json").read_text())
        assert r["status"] == "completed" and r["run"]["resumed_from"]["epoch"] >= 1 and r["metrics"]["epochs"] == 8


@pytest.mark.slow
def test_a_bad_sweep_value_refuses_its_job_whether_first_or_not(tmp_path):
    """enc_L=5,-1 refused the -1 job only; enc_L=-1,5 refused the whole sweep before any job."""
    # -m between overrides, as `... enc_L=5,7,10 -m data.limit=6000` is typed (argparse refused it)
    proc = run_cli(*SMOKE, "enc_L=-1,-2", "-m", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: 2 of 2 jobs failed or were refused" in proc.stderr
    assert proc.stderr.count("enc_L: got -1;") >= 1 and proc.stderr.count("enc_L: got -2;") >= 1
    shared = run_cli(*SMOKE, "enc_L=-1,-2", "model.hidden=[31,32]", f"hydra.sweep.dir={tmp_path / 'b'}", "-m")
    assert shared.returncode == 2  # what every job shares is still refused once, before any job
    assert shared.stderr.strip().splitlines()[-1].startswith("error: model.hidden: got [31, 32]")


def test_a_resume_compares_every_recorded_field():
    """No field is taken for its default when the stored config lacks it (that would be a
    migration): absent there is a difference, as another architecture is; the fields a resume
    may change are not."""
    from omegaconf import OmegaConf

    from lipvae.runfolder import config_differences

    given = composed()
    old = OmegaConf.to_container(given, resolve=False)
    del old["model"]["arch"], old["objective"]
    old["module"]["lr"] = 0.5
    assert config_differences(OmegaConf.create(old), given) == ["model.arch.channels", "model.arch.kernel_size",
                                                                "model.arch.kind"]
    conv = OmegaConf.to_container(composed("model/arch=conv"), resolve=False)
    assert config_differences(OmegaConf.create(conv), given) == ["model.arch.channels", "model.arch.kernel_size",
                                                                 "model.arch.kind"]


def test_a_single_value_where_a_list_is_meant_is_that_list():
    """certify.r=8 was refused ('accepted: a list'); it means [8], for lipvae's checks and Hydra's."""
    proc = run_cli("certify.r=8", "certify.forms=tight", "model.hidden=64", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("  r:\n  - 8", "  forms:\n  - tight", "  hidden:\n  - 64"):
        assert line in proc.stdout, line
    bad = run_cli(*SMOKE, "certify.r=-8")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: certify.r: got [-8]")


@pytest.mark.parametrize("preset", ["fig3", "fig4", "fig5", "fig6_7"])
def test_the_converged_tier_stops_every_arm_by_one_rule_and_never_by_the_clock(preset):
    from lipvae.config import validate

    for variant in (["variant=standard"], ["variant=lipschitz_L7"]) if preset == "fig5" else ([],):
        cfg = composed(f"experiment={preset}", "tier=converged", *variant)
        validate(cfg)
        assert cfg.trainer.max_time is None and cfg.trainer.max_epochs == 400
        stop = cfg.callbacks.early_stopping
        assert (stop.monitor, stop.patience, stop.min_delta) == ("val/loss", 5, 1.0)
        assert cfg.data.resplit is False and cfg.attack.warm_steps == 0 and cfg.evaluate == "best"
        assert cfg.model.hidden == [256, 256] and cfg.module.lr == 1e-3
        if cfg.model.kind == "lipschitz":
            assert cfg.model.layer._target_ == "lipvae.networks.StiefelLinear" and cfg.module.retract_every == 1


def test_the_paper_script_refuses_an_unknown_stage_before_any_work(tmp_path):
    import subprocess

    script = Path(__file__).parents[1] / "sweeps" / "paper.sh"
    out = subprocess.run(["bash", str(script), "fig5", "fig8"], capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path / "paper"), "PY": "false"})
    assert out.returncode == 2 and not (tmp_path / "paper").exists()
    assert out.stderr.strip() == "error: stage: got 'fig8'; accepted: fig5, fig1_2, fig3, fig4, fig6_7, checks"


def test_the_paper_script_picks_runs_by_their_recorded_config(tmp_path):
    """Figure 1 and Figure 4 reuse Figure 5's and Figure 3's models, found by what each run's
    results.json records (a sweep folder's names do not carry γ)."""
    import subprocess
    import sys

    for name, config in {"0_a": {"enc_L": 5.0, "seed": 0, "model": {"kind": "lipschitz", "encoder_std": {"gamma": 0.1}}},
                         "1_b": {"enc_L": 5.0, "seed": 0, "model": {"kind": "standard", "encoder_std": {"gamma": 0.1}}},
                         "2_c": {"enc_L": 5.0, "seed": 1, "model": {"kind": "lipschitz", "encoder_std": {"gamma": 0.2}}}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"status": "completed", "config": config}))
    script = Path(__file__).parents[1] / "sweeps" / "paper.sh"
    snippet = (f'eval "$(sed -n "/^runs_where()/,/^}}/p" {script})"; '
               f'runs_where {tmp_path} model.kind=lipschitz enc_L=5.0 seed=0; echo --; '
               f'runs_where {tmp_path} model.encoder_std.gamma=0.1')
    out = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, env={**os.environ, "PY": sys.executable})
    first, second = out.stdout.split("--\n")
    assert first.split() == [str(tmp_path / "0_a")] and second.split() == [str(tmp_path / n) for n in ("0_a", "1_b")]


def test_every_group_node_is_its_classs_arguments():
    """The attack and certify nodes are exactly what their classes take (built by instantiate, no
    field filtered out): which inputs and whether are the margins group's, not the attack's."""
    import inspect

    from hydra.utils import get_class

    from lipvae.build import build_attack, build_certifier

    for option in ("pgd", "pgd_cold", "pgd_quick", "pgd_smoke", "lbfgs"):
        node = composed(f"attack={option}").attack
        params = inspect.signature(get_class(node._target_)).parameters
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        assert set(node) - {"_target_"} <= set(params), (option, set(node) - set(params))
        assert type(build_attack(node)).__name__ == node._target_.rsplit(".", 1)[1]
    cfg = composed()
    params = inspect.signature(get_class(cfg.certify._target_)).parameters
    assert set(cfg.certify) - {"_target_"} == set(params)
    certifier = build_certifier(cfg.certify)
    assert (certifier.r, certifier.p, certifier.forms) == ([8.0], [0.5], ["tight", "exact", "paper"])
    assert set(cfg.margins) == {"certify", "certified_inputs", "attack", "attacked_inputs", "latent"}


@pytest.mark.parametrize("overrides", [(), ("attack=lbfgs",), ("model/arch=conv",), ("margins/latent=soft",),
                                       ("model=standard", "tier=official")])
def test_every_field_of_the_schema_has_its_default_in_the_yaml_files(overrides):
    """What a run records is what it used: no field of lipvae's own nodes takes a default from the
    schema (lipvae.schema) that the composed YAML files lack; and the composed config passes."""
    from omegaconf import OmegaConf
    from pydantic import BaseModel

    from lipvae.schema import ATTACKS, ENTRIES, ImageDataConfig, RootConfig

    cfg = composed(*overrides)

    def walk(node, schema, path):
        fields = {f.alias or name: f.annotation for name, f in schema.model_fields.items()}
        assert set(fields) <= set(node), f"{path}: {sorted(set(fields) - set(node))} only in the schema"
        for key, kind in fields.items():
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(node[key], kind, f"{path}{key}.")

    walk(cfg, RootConfig, "")
    walk(cfg.data, ImageDataConfig, "data.")
    walk(cfg.attack, ATTACKS[cfg.attack._target_], "attack.")
    for path, schema in ENTRIES.items():
        if OmegaConf.select(cfg, path) is not None:
            walk(OmegaConf.select(cfg, path), schema, path + ".")
    validate(cfg, machine=False)


def test_a_number_from_an_environment_variable_is_text_and_the_error_says_how_to_read_it(monkeypatch):
    """${oc.env:NAME} is always a string, which the schema refuses for a number (the objects would
    get text); the one line says so and how to decode it, and the decoded value passes."""
    monkeypatch.setenv("LIPVAE_TEST_SEED", "3")
    cfg = composed("seed=${oc.env:LIPVAE_TEST_SEED}")
    with pytest.raises(UserError, match=re.escape("seed: got '3'; accepted: an integer in [0, 2^32) (this is text")):
        validate(cfg, machine=False)
    cfg.seed = "${oc.decode:${oc.env:LIPVAE_TEST_SEED}}"
    validate(cfg, machine=False)
    assert cfg.seed == 3
    with pytest.raises(UserError) as plain_text:  # a word is not a number: no hint
        validate(composed("seed=abc"), machine=False)
    assert "oc.decode" not in str(plain_text.value)


def test_one_walk_of_the_schema_knows_lists_and_closed_nodes_everywhere():
    """Which fields are lists (a single value is a list of one) and which nodes are closed (no
    '+key' hint) come from one walk of the schema: lipvae's own callback and logger entries and
    Optional list fields included; the top level offers no '+key' (a mistyped key is a typo)."""
    from lipvae.compose import as_list_where_meant, compose_config

    assert [as_list_where_meant(a) for a in ("logger.wandb.tags=x", "model.arch.channels=16", "enc_L=5")] == [
        "logger.wandb.tags=[x]", "model.arch.channels=[16]", "enc_L=5"]
    for override, hinted in (("callbacks.finetune.colour=red", False), ("enc_l=5", False), ("logger.tb=1", True)):
        with pytest.raises(UserError) as err:
            compose_config([override])
        assert ("to add a new field" in str(err.value)) == hinted, str(err.value)
