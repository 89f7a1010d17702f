"""A run folder from elsewhere is data: no code from it runs, no link in it is followed, no
special file in it is opened blindly (lipvae.safety)."""

import base64
import io
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lipvae.certify.__main__ import main as certify_main
from lipvae.errors import UserError
from lipvae.evaluate import main as evaluate_main
from lipvae.report import main as report_main
from lipvae.safety import (NoFollowFileHandler, UnsafeFile, check_entries, check_targets, packaged_targets,
                           read_regular, untrusted_targets)

from conftest import composed, run_cli


class _Touch:
    """A pickle that creates a marker file when it is loaded: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_chain(marker: Path) -> dict:
    """The audit's config field: torch.load(BytesIO(b64decode(...)), weights_only=False)."""
    buf = io.BytesIO()
    torch.save(_Touch(marker), buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    payload = base64.b64encode(buf.getvalue()).decode()
    return {"_target_": "torch.load", "weights_only": False,
            "_args_": [{"_target_": "io.BytesIO", "_args_": [{"_target_": "base64.b64decode", "_args_": [payload]}]}]}


def test_every_packaged_preset_passes_and_a_nested_foreign_target_is_named():
    """What lipvae composes itself is trusted; a foreign name anywhere (nested in ``_args_``,
    in a list, at a callback entry outside Lightning's callbacks) is reported by its field."""
    for overrides in [(), ("model=standard",), ("attack=lbfgs",), ("tier=paper",), ("model/layer=bjorck",),
                      ("model/layer=torchlip",), ("model/layer=aol",)]:
        check_targets(OmegaConf.to_container(composed(*overrides), resolve=True), "composed")
    assert {"lipvae.attack.PGDAttack", "lipvae.networks.BjorckLinear", "lightning.pytorch.Trainer"} <= packaged_targets()
    chain = _pickle_chain(Path("/nonexistent/marker"))
    bad = untrusted_targets({"model": {"layer": {"iters": chain}}}, packaged_targets())
    assert [f for f, _ in bad] == ["model.layer.iters._target_", "model.layer.iters._args_[0]._target_",
                                   "model.layer.iters._args_[0]._args_[0]._target_"]
    lightning_cb = {"callbacks": {"swa": {"_target_": "lightning.pytorch.callbacks.StochasticWeightAveraging"}}}
    assert untrusted_targets(lightning_cb, packaged_targets()) == []
    nested = {"callbacks": {"swa": {"x": {"_target_": "lightning.pytorch.callbacks.Callback"}}}}
    assert untrusted_targets(nested, packaged_targets()) == [("callbacks.swa.x._target_",
                                                               "lightning.pytorch.callbacks.Callback")]
    assert untrusted_targets({"attack": {"_target_": "my.Attack"}}, packaged_targets() | {"my.Attack"}) == []
    with pytest.raises(UserError, match=r"^attack\._target_: .* names the target 'os\.system'"):
        check_targets({"attack": {"_target_": "os.system"}}, "stored")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "certify"])
def test_a_crafted_config_is_refused_before_anything_runs(smoke_runs, tmp_path, monkeypatch, synthetic_root,
                                                          capsys, command):
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    run = shutil.copytree(smoke_runs[("lipschitz", "learned")], tmp_path / "run")
    marker = tmp_path / "code_ran"
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.model.layer.iters = _pickle_chain(marker)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    before = sorted(p.name for p in run.iterdir())
    code = evaluate_main([str(run)]) if command == "evaluate" else certify_main(["model", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model.layer.iters._target_:"), err
    assert "torch.load" in err[0] and not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == before  # no evaluation folder made
    # the same class named by the user's own config folder is theirs to trust
    (tmp_path / "conf" / "attack").mkdir(parents=True)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.model.layer.iters = 1
    cfg.attack._target_ = "my_attacks.Random"
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    assert evaluate_main([str(run)]) == 2
    assert "'my_attacks.Random'" in capsys.readouterr().err
    (tmp_path / "conf" / "attack" / "random.yaml").write_text("_target_: my_attacks.Random\n")
    assert evaluate_main(["--config-dir", str(tmp_path / "conf"), str(run)]) == 2
    err = capsys.readouterr().err
    assert "names the target" not in err and "my_attacks" in err  # past the check: the module is not there


def test_a_python_tag_in_a_stored_yaml_is_one_line(tmp_path):
    from lipvae.stored import load_config

    path = tmp_path / "hydra.yaml"
    path.write_text("hydra: !!python/object/apply:os.system ['touch /tmp/x']\n")
    with pytest.raises(UserError, match=r"^config: .*hydra\.yaml is not valid YAML"):
        load_config(path)


# --- links and special files -----------------------------------------------------------------


def test_read_regular_refuses_links_fifos_devices_and_huge_files(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    assert read_regular(real) == "{}"
    (tmp_path / "link.json").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    for name, what in [("link.json", "symlink"), ("fifo.json", "FIFO"), ("zero.json", "symlink")]:
        with pytest.raises(UnsafeFile, match=what):
            read_regular(tmp_path / name)
    with pytest.raises(UnsafeFile, match="more than"):
        read_regular(real, limit=1)
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing")


@pytest.mark.parametrize("name, kind", [(".lipvae.lock", "link"), ("evaluations", "link"), (".hydra", "link"),
                                        ("train.log", "link"), ("certified_margins.png", "link"),
                                        ("results.json", "fifo"), (".lipvae.lock", "dir"), ("evaluations", "file")])
def test_check_entries_refuses_each_planted_entry(tmp_path, name, kind):
    run, target = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    target.mkdir() if name in ("evaluations", ".hydra") else target.write_text("precious")
    if kind == "link":
        (run / name).symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(run / name)
    elif kind == "dir":
        (run / name).mkdir()
    else:
        (run / name).write_text("x")
    with pytest.raises(UnsafeFile, match=rf"^{run / name}: is "):
        check_entries(run)
    (run / name).unlink() if kind != "dir" else (run / name).rmdir()
    check_entries(run)  # and a clean folder passes


def test_nested_links_in_evaluations_and_checkpoints_are_refused(tmp_path):
    run = tmp_path / "run"
    (run / "evaluations" / "20260101-000000").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    check_entries(run)
    (run / "evaluations" / "20260101-000000" / "margins.csv").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFile, match="margins.csv: is a symlink"):
        check_entries(run)
    (run / "evaluations" / "20260101-000000" / "margins.csv").unlink()
    (run / "checkpoints" / "last.ckpt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFile, match="last.ckpt: is a symlink"):
        check_entries(run)


def test_the_job_log_never_writes_through_a_link(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    link = tmp_path / "train.log"
    link.symlink_to(target)
    handler = NoFollowFileHandler(str(link))
    handler.emit(__import__("logging").makeLogRecord({"msg": "appended?"}))
    handler.close()
    assert target.read_text() == "precious\n"
    plain = NoFollowFileHandler(str(tmp_path / "real.log"))
    plain.emit(__import__("logging").makeLogRecord({"msg": "kept"}))
    plain.close()
    assert (tmp_path / "real.log").read_text() == "kept\n"


@pytest.fixture
def copied(smoke_runs, tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    return shutil.copytree(smoke_runs[("lipschitz", "learned")], tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("name", [".lipvae.lock", "evaluations"])
def test_evaluate_refuses_a_planted_link_and_leaves_its_target(copied, tmp_path, capsys, name):
    target = tmp_path / "victim"
    target.mkdir() if name == "evaluations" else target.write_text("precious")
    (copied / name).unlink(missing_ok=True) if not (copied / name).is_dir() else shutil.rmtree(copied / name)
    (copied / name).symlink_to(target)
    assert evaluate_main([str(copied)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name}: is a symlink" in err[0], err
    assert (list(target.iterdir()) == [] if target.is_dir() else target.read_text() == "precious")


@pytest.mark.slow
def test_a_resume_into_a_folder_with_a_planted_log_link_is_refused(copied, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    (copied / "train.log").unlink()
    (copied / "train.log").symlink_to(target)
    overrides = [o for o in OmegaConf.load(copied / ".hydra" / "overrides.yaml") if not o.startswith("hydra.")]
    proc = run_cli(*overrides, f"hydra.run.dir={copied}", "resume=true")
    assert proc.returncode == 2 and "train.log: is a symlink" in proc.stderr, proc.stderr[-2000:]
    assert target.read_text() == "precious\n"


@pytest.mark.slow
def test_report_refuses_a_planted_figure_link_and_a_fifo_record_does_not_hang(copied, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.move(copied, sweep / "0_run")
    target = tmp_path / "victim.png"
    target.write_bytes(b"precious")
    (sweep / "tightness.png").symlink_to(target)
    assert report_main([str(sweep)]) == 2
    assert "tightness.png: is a symlink" in capsys.readouterr().err
    assert target.read_bytes() == b"precious"
    (sweep / "tightness.png").unlink()
    (sweep / "1_fifo" / ".hydra").mkdir(parents=True)
    os.mkfifo(sweep / "1_fifo" / "results.json")

    def hung(*args):
        raise TimeoutError("report hung on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        assert report_main([str(sweep)]) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "FIFO" in (sweep / "report.md").read_text()
    assert json.loads((sweep / "0_run" / "results.json").read_text())["status"] == "completed"


def test_a_later_multirun_never_replaces_the_sweeps_first_record(tmp_path):
    """Hydra rewrites <sweep>/multirun.yaml at every multirun: the first sweep's record stays, a
    later one's goes beside it, also when the later multirun was killed before its end."""
    from lipvae.sweep import SweepSummary

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    callback = SweepSummary()
    callback.on_multirun_start(cfg)
    (sweep / "multirun.yaml").write_text("first\n")  # what Hydra writes after the callback
    callback.on_multirun_end(cfg)
    assert (sweep / "multirun.yaml").read_text() == "first\n" and len(list(sweep.glob("multirun*"))) == 1
    callback.on_multirun_start(cfg)
    (sweep / "multirun.yaml").write_text("second: refused jobs\n")
    callback.on_multirun_end(cfg)
    assert (sweep / "multirun.yaml").read_text() == "first\n"
    assert [p.read_text() for p in sweep.glob("multirun-*.yaml")] == ["second: refused jobs\n"]
    callback.on_multirun_start(cfg)
    (sweep / "multirun.yaml").write_text("third: killed\n")  # no on_multirun_end: the process died
    SweepSummary().on_multirun_start(cfg)  # the next multirun puts the first record back first
    assert (sweep / ".multirun.first.yaml").read_text() == "first\n"  # set aside again for this multirun
    assert sorted(p.read_text() for p in sweep.glob("multirun-*.yaml")) == ["second: refused jobs\n", "third: killed\n"]


def test_a_sweep_worker_stops_its_job_when_the_launcher_is_gone():
    """joblib's workers outlived a killed sweep (1.2 GB each, training on, holding their jobs'
    folders): the watcher stops the job as SIGTERM would once the launching process has ended."""
    import threading
    import time

    from lipvae.train import watch_launcher

    parents = iter([100, 100, 100, 1])  # the launcher, then init: re-parented after its death
    stopped = threading.Event()
    thread = watch_launcher(100, getppid=lambda: next(parents, 1), stop=stopped.set, poll=0.01)
    thread.join(timeout=10)
    assert stopped.is_set() and not thread.is_alive()
    alive = threading.Event()
    watch_launcher(100, getppid=lambda: 100, stop=alive.set, poll=0.01)
    time.sleep(0.1)
    assert not alive.is_set()  # the launcher still there: the job goes on


def test_a_lock_left_by_an_ended_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    import logging
    import os

    from lipvae.runfolder import claim

    (tmp_path / ".lipvae.lock").write_text("999999999\n")  # no such process
    with caplog.at_level(logging.INFO, logger="lipvae"):
        claim(tmp_path).release()
    assert "taking over the lock of process 999999999, which has ended" in caplog.text
    assert (tmp_path / ".lipvae.lock").read_text() == f"{os.getpid()}\n"


def test_a_released_claim_names_no_process_so_the_next_claim_is_quiet(tmp_path, caplog):
    """A PID in the lock file means its process was killed while holding the folder: a claim given
    up normally (lipvae.runfolder.release, as training and evaluation end) leaves the file empty."""
    import logging

    from lipvae.runfolder import claim, release

    release(claim(tmp_path))
    assert (tmp_path / ".lipvae.lock").read_text() == ""
    (tmp_path / ".lipvae.lock").write_text("999999999\n")
    with caplog.at_level(logging.INFO, logger="lipvae"):
        release(claim(tmp_path))
        assert caplog.text.count("taking over the lock") == 1
        release(claim(tmp_path))
    assert caplog.text.count("taking over the lock") == 1


@pytest.mark.slow
def test_a_read_only_run_or_report_folder_is_one_line(copied, tmp_path, capsys, monkeypatch):
    """As on a read-only mount (root ignores permission bits, so the file system's answer is simulated)."""
    import errno

    import lipvae.report as report
    import lipvae.runfolder as runfolder

    real_open = runfolder.os.open

    def read_only(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    with monkeypatch.context() as m:
        m.setattr(runfolder.os, "open", read_only)
        assert evaluate_main([str(copied)]) == 2
        assert certify_main(["model", str(copied)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: run: cannot write to ") and "Read-only file system" in e for e in err)

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(report, "write_table", refuse)
    assert report_main([str(copied)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write to {copied / 'results.csv'} (Read-only file system); make it writable or"
                   " write the report elsewhere (--out)"]


def test_a_failed_torch_save_is_an_oserror(tmp_path):
    """torch.save's own writer failed with a RuntimeError whose text varies ('unexpected pos',
    'iostream error') under a file-size limit: lipvae's saves raise the OSError (EFBIG)."""
    import subprocess
    import sys

    script = ("import resource, signal, torch\n"
              "from lipvae.results import torch_save\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))\n"
              "try:\n"
              f"    torch_save({{'x': torch.zeros(100_000)}}, {str(tmp_path / 'w.pt')!r})\n"
              "except OSError as e:\n"
              "    print('errno', e.errno)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "errno 27", out.stderr[-2000:]  # EFBIG, one of the full-disk errors


@pytest.mark.parametrize("argv", [["--help"], ["model", "--help"], ["design", "-h"]])
def test_certify_help_explains_its_arguments(argv, capsys):
    assert certify_main(argv) == 0
    out = capsys.readouterr().out
    assert "design:" in out and "tightness:" in out and "r        the reconstruction distance" in out


def test_evaluate_help_explains_its_arguments(capsys):
    assert evaluate_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lipvae.evaluate <run folder>") and "--replace" in out and "data.root=DIR" in out


def test_a_command_reports_what_a_user_can_fix_in_one_line_and_nothing_else(capsys):
    """lipvae.errors.command: the run's status; a UserError or a folder that cannot be written to
    is one ``error:`` line and status 2; any other error propagates."""
    import errno

    from lipvae.errors import UserError, command

    assert command(lambda: 7, "x") == 7
    assert capsys.readouterr().err == ""

    def bad():
        raise UserError("a: got 1; accepted: 2")

    assert command(bad, "x") == 2
    assert capsys.readouterr().err == "error: a: got 1; accepted: 2\n"

    def read_only():
        raise OSError(errno.EACCES, "Permission denied", "/r/f")

    assert command(read_only, "write it elsewhere") == 2
    assert capsys.readouterr().err == ("error: cannot write to /r/f (Permission denied); make it writable or"
                                       " write it elsewhere\n")

    def missing():
        raise OSError(errno.ENOENT, "No such file", "/r/f")

    with pytest.raises(FileNotFoundError):
        command(missing, "x")
