"""Run records survive re-runs, resumes, signals, collisions and full disks (issue: run records)."""

import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import CONF, SMOKE, composed, run_cli, start_cli
from lipvae.errors import UserError
from lipvae.runfolder import RunFolderError, check_run_folder, claim, config_differences
from lipvae.training import check_finite, check_shapes

def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "train.log"}


@pytest.mark.slow
def test_a_completed_run_is_never_overwritten(tmp_path, smoke_runs):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs[("lipschitz", "learned")], run)  # a job of conftest's smoke sweep
    ran = [*SMOKE, "model=lipschitz", "model.encoder_std.mode=learned"]  # its overrides
    before = snapshot(run)
    # 1. the same folder again, without resume: refused, nothing written
    proc = run_cli(*ran, f"hydra.run.dir={run}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: run: {run} already holds a completed run")
    # 2. resume with a typo'd constant, or without the original preset: refused, keys named
    proc = run_cli(*ran, "enc_L=6", "resume=true", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "differs from the one stored" in proc.stderr and " at enc_L;" in proc.stderr
    proc = run_cli("data.resplit=true", "resume=true", f"hydra.run.dir={run}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "data.limit" in last and "resume with the run's original overrides" in last
    # 3. resume of the same config: nothing to do, exit 0
    proc = run_cli(*ran, "resume=true", f"hydra.run.dir={run}")
    assert proc.returncode == 0 and "already completed; nothing to resume" in proc.stderr
    assert snapshot(run) == before
    assert json.loads((run / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow  # runs the CLI in-process twice
def test_resume_checks_before_anything_is_written(tmp_path):
    cfg = composed(*SMOKE, "resume=true")
    with pytest.raises(RunFolderError, match="last.ckpt does not exist, so there is nothing to resume"):
        check_run_folder(cfg, tmp_path)  # no checkpoint: no silent fresh start
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="holds an unfinished run .* add resume=true"):
        check_run_folder(composed(*SMOKE), tmp_path)  # a fresh start would overwrite the checkpoint
    check_run_folder(cfg, tmp_path)  # resume with a checkpoint: allowed
    # keys a resume may change, and those it may not
    same = composed(*SMOKE, "resume=true", "module.lr=1e-5", "attack.steps=7", "certify.forms=[paper]")
    assert config_differences(composed(*SMOKE), same) == []
    assert config_differences(composed(*SMOKE), composed(*SMOKE, "model.hidden=[16,16]", "seed=3")) == [
        "model.hidden", "seed"
    ]
    # written differently, the same once resolved: a run named by an older lipvae's pattern, an
    # interpolation given as its value
    older = composed(*SMOKE)
    older.name = "lipschitz_encL${enc_L}_decL${dec_L}"
    assert config_differences(older, composed(*SMOKE)) == []
    assert config_differences(composed(*SMOKE), composed(*SMOKE, "dec_L=5.0")) == []
    assert config_differences(composed(*SMOKE), composed(*SMOKE, "dec_L=6.0")) == ["dec_L"]
    assert config_differences(older, composed(*SMOKE, "enc_L=6.0")) == ["enc_L", "name"]


def test_a_checkpoint_from_other_networks_is_one_line():
    small, big = {"w": torch.zeros(4, 3)}, {"w": torch.zeros(8, 3)}
    check_shapes(small, small, Path("c.ckpt"))
    with pytest.raises(UserError, match=r"does not fit this config's model \(w: shape \(4, 3\), expected \(8, 3\)\)"):
        check_shapes(small, big, Path("c.ckpt"))
    with pytest.raises(UserError, match=r"\(v: missing"):
        check_shapes(small, {"v": torch.zeros(1)}, Path("c.ckpt"))


def test_one_process_per_run_folder(tmp_path):
    held = claim(tmp_path)
    assert (tmp_path / ".lipvae.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunFolderError, match="is in use by another lipvae process"):
        claim(tmp_path)
    held.release()
    claim(tmp_path).release()  # free again once the holder is gone
    raw = (CONF / "config.yaml").read_text()  # run and job folders name the seed (and the job)
    assert "dir: outputs/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}_${name}_seed${seed}" in raw
    assert "subdir: ${hydra.job.num}_${name}_seed${seed}" in raw


def test_non_finite_results_fail_the_run():
    cfg = composed(*SMOKE)
    check_finite({"metrics.test_elbo": -3.0, "metrics.test_log_likelihood": None}, cfg)  # None: not computed
    with pytest.raises(UserError, match=r"results: metrics.test_log_likelihood is nan; the model diverged.*module.lr="):
        check_finite({"metrics.test_elbo": -3.0, "metrics.test_log_likelihood": float("nan")}, cfg)
    with pytest.raises(UserError, match="orthonormality_error_before_freeze is inf"):
        check_finite({"metrics.orthonormality_error_before_freeze": float("inf")}, cfg)


@pytest.mark.slow
def test_diverged_run_ends_failed_not_completed(tmp_path):
    proc = run_cli(*SMOKE, "module.lr=1e30", "margins.attack=false", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "failed" and "module.lr=1e+30 too high" in r["error"] and "model.optim" not in r["error"]


@pytest.mark.slow
def test_sigterm_during_the_attack_stops_within_5_s_and_resumes(tmp_path):
    # the fine-tune phase converges (every loss change is within tol) 2 epochs in, 8 before its limit
    args = [*SMOKE, "margins.attacked_inputs=25", "attack.steps=3000", "attack.starts=5", "callbacks.finetune.max_epochs=10",
            "callbacks.finetune.tol=1e9", "callbacks.finetune.patience=1", f"hydra.run.dir={tmp_path}"]
    proc = start_cli(*args)
    log = tmp_path / "train.log"
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and "certified (r=" in log.read_text():
            break  # certification is done: the attack is running
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before the attack could be interrupted"
    time.sleep(1.0)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 5, f"took {time.time() - sent:.1f} s to stop"
    assert proc.returncode == 143, err[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "interrupted" and "resume=true" in r["error"]
    # the trained state is kept: resuming goes straight to the evaluation, with no epoch more
    # (the evaluation's settings may change on resume: the evaluation starts over)
    done = run_cli(*args[:-1], "margins.attacked_inputs=3", "attack.steps=20", "resume=true", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "completed" and r["estimated"]["num_inputs"] == 3
    assert r["metrics"]["epochs"] == 3 and r["metrics"]["stop_reason"] == "finetune_converged"
    assert not (tmp_path / "attack_state.pt").exists() and not (tmp_path / "attack_state.csv").exists()


@pytest.mark.slow
def test_disk_full_is_one_line_and_leaves_no_partial_file(tmp_path):
    # writes beyond 60 kB fail with EFBIG, as a full disk fails with ENOSPC
    proc = run_cli(*SMOKE, "model.hidden=[64,64]", f"hydra.run.dir={tmp_path}", process=True, file_size=60_000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left while writing to the run folder {tmp_path} (")
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*.tmp*"))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # never a truncated checkpoint
    # with no checkpoint there is nothing to resume: the hint starts it again (resume=true would be refused)
    assert last.endswith(f"no checkpoint was written yet: run the same command plus hydra.run.dir={tmp_path}"
                         " resume=auto to start it again")


@pytest.mark.slow
def test_a_sweep_jobs_resume_hint_resumes_that_job(tmp_path):
    args = [*SMOKE, "margins.attack=false", "model.hidden=[256,256]", "trainer.max_epochs=6",
            "callbacks.early_stopping.patience=100", "enc_L=5,7", f"hydra.sweep.dir={tmp_path}", "-m"]
    proc = start_cli(*args)
    deadline = time.time() + 120
    while not list(tmp_path.glob("0_*/checkpoints/last.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C (the other tests send SIGTERM: one handler serves both)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    (job,) = tmp_path.glob("0_*")
    assert "seed0" in job.name
    r = json.loads((job / "results.json").read_text())
    assert r["status"] == "interrupted"
    hint = r["error"].split("resume this job alone with: ")[1]
    assert hint.startswith("python -m lipvae.train ") and hint.endswith(f"hydra.run.dir={job} resume=true")
    assert " -m" not in hint.removeprefix("python -m") and "enc_L=5" in hint and "enc_L=5,7" not in hint
    done = run_cli(*shlex.split(hint)[3:])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((job / "results.json").read_text())["status"] == "completed"


def test_resume_auto_continues_only_what_exists(tmp_path):
    """resume=auto starts where there is nothing and resumes where there is a checkpoint, both
    without a refusal, where resume=false refuses the folder with a checkpoint and resume=true
    the empty one."""
    auto, fresh, resume = (composed(*SMOKE, f"resume={v}") for v in ("auto", "false", "true"))
    check_run_folder(auto, tmp_path)  # nothing there: a fresh start
    with pytest.raises(RunFolderError, match="nothing to resume"):
        check_run_folder(resume, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    check_run_folder(auto, tmp_path)  # a checkpoint: resumed (same config: nothing stored to differ)
    with pytest.raises(RunFolderError, match="holds an unfinished run"):
        check_run_folder(fresh, tmp_path)
    # resume=maybe: refused by the schema before the folder is looked at (test_reliability's list)


@pytest.mark.slow  # composes with Hydra's launcher plugins
def test_slurm_launcher_requeues_on_preemption():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = composed("hydra/launcher=slurm", hydra=True)
    assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.signal_delay_s > 0
    assert "resume=auto" in (CONF / "hydra" / "launcher" / "slurm.yaml").read_text()


def test_a_failure_is_recorded_beside_a_completed_record(tmp_path):
    from lipvae.results import Results
    from lipvae.train import _record

    Results.from_dict({"status": "completed", "n": 1}).write(tmp_path)
    before = (tmp_path / "results.json").read_text()
    _record(composed(*SMOKE), tmp_path, "failed", "something broke")
    assert (tmp_path / "results.json").read_text() == before
    (attempt,) = tmp_path.glob("attempt-*-failed.json")
    assert json.loads(attempt.read_text())["error"] == "something broke"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _record(composed(*SMOKE), fresh, "interrupted", "interrupted (SIGTERM)")
    assert json.loads((fresh / "results.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_two_devices_train_together_and_rank_zero_alone_records(tmp_path):
    proc = run_cli(*SMOKE, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                   f"hydra.run.dir={tmp_path}", process=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "completed" and r["metrics"]["epochs"] == 2 and r["soundness_violations"] == 0
    other, zero = (tmp_path / "train_ddp_process_1.log").read_text(), (tmp_path / "train.log").read_text()
    assert "results written" not in other and "results written" in zero
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*.tmp"))
    # every epoch metric is averaged over the devices (each validates half the inputs, and the best
    # checkpoint, early stopping and the fine-tune stop must decide alike): Lightning warns of any
    # metric that is not; the epoch's line is rank zero's alone
    assert "sync_dist=True" not in proc.stderr, proc.stderr[-3000:]
    assert zero.count("epoch 1/2:") == 1 and "epoch 1/2:" not in other


def test_a_data_limit_too_small_for_the_splits_is_caught_before_training(synthetic_root):
    from lipvae.build import build_datamodule

    cfg = composed(*SMOKE, "data.limit=1", f"data.root={synthetic_root / 'mnist'}")
    with pytest.raises(UserError, match=r"data.limit: got 1, which leaves 0 training and 1 test images; accepted"):
        build_datamodule(cfg.data, 0).setup()
    build_datamodule(composed(*SMOKE, "data.limit=3", f"data.root={synthetic_root / 'mnist'}").data, 0).setup()


def test_an_accelerator_that_is_not_there_is_refused():
    from lipvae.config import validate

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="trainer.accelerator: got 'gpu', but no CUDA device is visible"):
            validate(composed(*SMOKE, "trainer.accelerator=gpu"))
    mps = getattr(torch.backends, "mps", None)
    if not (mps is not None and mps.is_available()):
        with pytest.raises(UserError, match="trainer.accelerator: got 'mps', but MPS is not available"):
            validate(composed(*SMOKE, "trainer.accelerator=mps"))


def test_float64_on_apples_mps_is_refused_before_any_work(monkeypatch):
    """MPS has no float64: trainer.precision=64-true where Lightning would pick MPS (a Mac without
    CUDA, accelerator auto or mps) is one line; on the CPU it is allowed."""
    from lipvae.config import validate

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("auto", "mps"):
        with pytest.raises(UserError, match=r"^trainer\.precision: got '64-true' on Apple's MPS, which has no float64;"
                           r" accepted: 32-true, or trainer\.accelerator=cpu$"):
            validate(composed(*SMOKE, "model/layer=aol", "trainer.precision=64-true", f"trainer.accelerator={accelerator}"))
    validate(composed(*SMOKE, "model/layer=aol", "trainer.precision=64-true", "trainer.accelerator=cpu"))
    validate(composed(*SMOKE, "trainer.accelerator=mps"))  # 32-bit on MPS is fine


def test_checkpoints_for_resume_are_lightning_checkpoints_loaded_safely(tmp_path):
    """A plain state dict as last.ckpt (a 36-line KeyError inside Lightning) and a malicious
    best.ckpt (a 38-line UnpicklingError) are one line each (issue 27)."""
    import pickle

    from lipvae.errors import UserError
    from lipvae.stored import load_checkpoint

    plain = tmp_path / "last.ckpt"
    torch.save({"encoder_mean.0.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(UserError, match=r"^checkpoint: .*last.ckpt is not a Lightning checkpoint \(a plain state dict\?\)"):
        load_checkpoint(plain)

    class Exploit:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "best.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Exploit(), "epoch": 1}))
    with pytest.raises(UserError, match=r"^checkpoint: cannot load .*best.ckpt safely \(UnpicklingError"):
        load_checkpoint(evil)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"vae.w": torch.zeros(1)}, "epoch": 3, "global_step": 30}, good)
    assert load_checkpoint(good)["epoch"] == 3


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import os

    from lipvae.runfolder import RunFolderError, claim

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(RunFolderError, match=r"^run: cannot write to .* \(Permission denied\); make it writable"):
        claim(tmp_path)



def test_a_sweepers_long_constants_make_short_run_names():
    """Optuna proposes constants such as 7.4881350392732475; the run (and its folder) is named with
    6 significant digits, while the constants as written keep their names."""
    from lipvae import short_number

    assert short_number(7.4881350392732475) == "7.48814" and short_number(12.000000000000002) == "12"
    assert [short_number(v) for v in (5.0, 0.25, 10.5, 3, "x")] == [5.0, 0.25, 10.5, 3, "x"]
    assert composed("enc_L=7.4881350392732475", "dec_L=12.000000000000002").name == "lipschitz_encL7.48814_decL12"
    assert composed().name == "lipschitz_encL5.0_decL5.0" and composed("enc_L=7", "dec_L=0.25").name == \
        "lipschitz_encL7_decL0.25"
    assert composed("model=standard").name == "standard"
