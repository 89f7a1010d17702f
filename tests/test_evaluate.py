"""``python -m lipvae.evaluate``: the evaluation pipeline run again on a finished run."""

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from lipvae.evaluate import main as evaluate_main
from lipvae.evaluation import soundness_violations


@pytest.fixture
def trained(smoke_runs):
    return smoke_runs[("lipschitz", "learned")]


@pytest.fixture
def run(trained, tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))  # the data the run trained on
    return shutil.copytree(trained, tmp_path / "run")


def _consistent(folder, record):
    """The margins table, the certified table and the recorded summary agree with each other."""
    margins = pd.read_csv(folder / "margins.csv")
    certified = pd.read_csv(folder / "certified_margins.csv").set_index("index")
    assert record["estimated"]["mean"] == pytest.approx(margins["estimated"].mean())
    assert record["certified"]["mean"] == pytest.approx(certified["certified_tight"].mean())
    assert (margins["certified_tight"].to_numpy() == certified.loc[margins["index"], "certified_tight"].to_numpy()).all()
    assert record["soundness_violations"] == len(soundness_violations(margins, ["certified_tight"]))


@pytest.mark.slow
def test_replace_updates_margins_figures_and_soundness_together(run, capsys, caplog):

    stored = json.loads((run / "results.json").read_text())
    scatter = (run / "certified_vs_estimated.png").stat().st_mtime_ns
    assert (run / ".lipvae.lock").read_text() == ""  # its training ended normally and said so
    with caplog.at_level(logging.INFO, logger="lipvae"):
        assert evaluate_main([str(run), "attack.steps=40", "attack.starts=3", "--replace"]) == 0
    assert "taking over the lock" not in caplog.text and (run / ".lipvae.lock").read_text() == ""
    assert capsys.readouterr().out.startswith(f"evaluation written to {run};")
    r = json.loads((run / "results.json").read_text())
    assert (r["estimated"]["steps"], r["estimated"]["starts"]) == (40, 3)
    assert (r["config"]["attack"]["steps"], r["config"]["attack"]["starts"]) == (40, 3)
    assert r["metrics"] == stored["metrics"] and r["status"] == "completed"
    assert not r["evaluation"]["reused_estimated_margins"]
    _consistent(run, r)
    assert (run / "certified_vs_estimated.png").stat().st_mtime_ns > scatter
    kept = run / r["evaluation"]["replaced"]
    assert json.loads((kept / "results.json").read_text()) == stored  # nothing is lost
    made = json.loads((run / r["evaluation"]["made_in"] / "evaluation.json").read_text())
    assert made["estimated"] == r["estimated"] and made["soundness_violations"] == r["soundness_violations"]


@pytest.mark.slow
def test_a_stop_during_replace_leaves_the_run_as_it_was(run, capsys, monkeypatch):
    from lipvae.attack import PGDAttack

    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lipvae.lock"}

    def stop(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(PGDAttack, "estimate", stop)  # after the new certificates are written
    assert evaluate_main([str(run), "attack.steps=40", "certify.forms=[paper]", "--replace"]) == 130
    assert "interrupted; the run's own files are as they were" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lipvae.lock"}
    assert after == before


@pytest.mark.slow
def test_default_writes_beside_the_run_and_reuses_an_unchanged_attack(run, capsys, caplog):
    stored = json.loads((run / "results.json").read_text())
    margins = (run / "margins.csv").read_bytes()
    with caplog.at_level(logging.INFO, logger="lipvae"):
        assert evaluate_main([str(run), "certify.p=[0.5,0.9]"]) == 0
    assert stored["estimated"]["censored"] == 0 and "censored:" not in caplog.text
    first = sorted((run / "evaluations").iterdir())
    assert len(first) == 1
    e = json.loads((first[0] / "evaluation.json").read_text())
    assert e["reused_estimated_margins"] and e["estimated"]["mean"] == pytest.approx(stored["estimated"]["mean"])
    assert e["latent_attack"] == stored["latent_attack"] and (first[0] / "latent_attack.png").is_file()
    _consistent(first[0], e)
    assert "certified_tight_r8_p0.9" in pd.read_csv(first[0] / "certified_margins.csv").columns
    assert json.loads((run / "results.json").read_text()) == stored and (run / "margins.csv").read_bytes() == margins
    # a changed attack (or --fresh) attacks again, into another folder; radii too small to move any
    # reconstruction leave every margin censored, which is said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lipvae"):
        assert evaluate_main([str(run), "seed=3", "attack.max_radius=0.01"]) == 0
    n = stored["estimated"]["num_inputs"]
    assert f"{n} of {n} estimated margins are censored: no perturbation up to attack.max_radius=0.01" in caplog.text
    tiny = json.loads((sorted((run / "evaluations").iterdir())[1] / "evaluation.json").read_text())
    assert tiny["estimated"]["censored"] == n and tiny["estimated"]["max"] == pytest.approx(0.01)
    assert tiny["certified"]["min"] > 0.01 and tiny["soundness_violations"] == 0  # certificates above a lower limit
    assert evaluate_main([str(run), "--fresh"]) == 0
    folders = sorted((run / "evaluations").iterdir())
    assert len(folders) == 3
    for folder in folders[1:]:
        assert not json.loads((folder / "evaluation.json").read_text())["reused_estimated_margins"]


@pytest.mark.slow
def test_a_run_trained_in_float64_is_evaluated_and_re_evaluated_in_float64(tmp_path, synthetic_root, monkeypatch):
    """trainer.precision=64-true (with layers that keep float64 weights) trains, certifies,
    attacks and records; the frozen model is float64, and a re-evaluation loads it as such and
    gets the run's own numbers."""
    from conftest import SMOKE, run_cli
    from lipvae.stored import load_model

    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    folder = tmp_path / "run64"
    proc = run_cli(*SMOKE, "model/layer=aol", "trainer.precision=64-true", "margins.attacked_inputs=3",
                   f"hydra.run.dir={folder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.loads((folder / "results.json").read_text())
    assert stored["status"] == "completed" and stored["soundness_violations"] == 0
    assert stored["certified"]["fraction_certified"] > 0 and stored["estimated"]["num_inputs"] == 3
    assert torch.load(folder / "frozen_model.pt", weights_only=True)["encoder_mean.0.weight"].dtype == torch.float64
    assert load_model(folder)[0].dtype == torch.float64
    assert evaluate_main([str(folder), "--fresh"]) == 0
    again = json.loads((next((folder / "evaluations").iterdir()) / "evaluation.json").read_text())
    assert again["certified"]["mean"] == pytest.approx(stored["certified"]["mean"], rel=1e-12)
    assert again["estimated"]["mean"] == pytest.approx(stored["estimated"]["mean"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["model.latent_dim=3"], "error: model.latent_dim: cannot change in a re-evaluation; accepted: certify.*, attack, attack.*, margins, margins.*, seed"),
        (["attack.stepz=3"], "error: attack.stepz: no such field; did you mean attack.steps?"),
        (["attack.steps=0"], "error: attack.steps: got 0; accepted: a positive integer"),
        (["attack.steps=abc"], "error: attack.steps: got 'abc'; accepted: a positive integer"),  # training's line
        (["attack=wild"], "error: attack: got 'wild'; accepted: lbfgs, pgd, pgd_cold, pgd_quick, pgd_smoke"),
        (["certify.p=0.5,0.9"], "error: certify.p=0.5,0.9: a sweep, which only training runs (with -m); a list is written certify.p=[0.5,0.9]"),
        (["+attack.extra=1"], "error: +attack.extra=1: only key=value"),
        (["margins.certified_inputs=2"], "error: margins.certified_inputs: got 2; accepted: null, or at least margins.attacked_inputs=5"),
        (["--replce"], "error: unknown flag --replce; accepted: --replace, --fresh"),
        (["certify.r=[28]"], "error: certify.r: got [28]; accepted: radii below √D = 28, the farthest two"
                             " reconstructions of these inputs (D = 784 values in [0, 1]) can be apart"),
    ],
)
def test_bad_overrides_are_one_line_and_write_nothing(run, capsys, args, message):
    before = sorted(p.name for p in run.iterdir())
    assert evaluate_main([str(run), *args]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert sorted(p.name for p in run.iterdir()) == before


def test_missing_run_is_one_line(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: run:")
    stamp = tmp_path / "run" / "evaluations" / "20261208-040701"  # a re-evaluation's folder given for its run
    stamp.mkdir(parents=True)
    assert evaluate_main([str(stamp)]) == 2
    assert capsys.readouterr().err.strip() == f"error: run: {stamp} is an evaluation of the run {tmp_path / 'run'};" \
        " give that run"


@pytest.mark.slow
def test_latent_attack_summary_says_how_far_toward_the_target(tmp_path):
    """No budget moves nothing; a budget large enough to replace the input reaches the target
    (share ≈ 1, every reconstruction nearer the target's than its own)."""
    from omegaconf import OmegaConf

    from lipvae.data import TensorBatches
    from lipvae.evaluation import _latent_attack
    from lipvae.vae import VAE

    torch.manual_seed(0)
    vae = VAE(input_shape=(1, 28, 28), latent_dim=2, hidden=(16, 16), std_mode="fixed", gamma=0.1).freeze().eval()
    gen = torch.Generator().manual_seed(0)
    test = TensorBatches(torch.rand(6, 784, generator=gen), torch.tensor([0, 1, 0, 1, 0, 1]), torch.arange(6))
    latent = OmegaConf.create({"kind": "hard", "budget": 0.0, "num_inputs": 6, "steps": 200, "penalty": None, "lr": None})
    still, _ = _latent_attack(vae, test, latent, True, "cpu", gen, tmp_path)
    assert still["median_share_moved"] == 0.0 and still["closer_to_target"] == 0.0
    latent.budget = 28.0  # the pixel box's diameter: x + δ may become the target itself
    far, _ = _latent_attack(vae, test, latent, True, "cpu", gen, tmp_path)
    assert far["median_share_moved"] == pytest.approx(1.0, abs=0.05) and far["closer_to_target"] == 1.0


def test_coupled_certificates_are_counted_apart_from_soundness_violations():
    """A coupled certificate above the estimated margin is allowed with probability α per input;
    a deterministic one never is (issue 27)."""
    import pandas as pd

    from lipvae.evaluation import coupled_exceedances, probabilistic, soundness_violations

    table = pd.DataFrame({"index": [0, 1, 2, 3], "estimated": [1.0, 1.0, 1.0, 1.0],
                          "certified_tight": [0.5, 0.5, 1.5, 0.5], "certified_coupled": [0.9, 1.2, 0.9, 1.1]})
    cols = ["certified_tight", "certified_coupled"]
    assert [c for c in cols if probabilistic(c)] == ["certified_coupled"]
    assert probabilistic("certified_coupled_r8_p0.5") and not probabilistic("certified_cantelli")
    assert soundness_violations(table, [c for c in cols if not probabilistic(c)]) == [2]
    got = coupled_exceedances(table, cols, alpha=0.25)
    assert got == {"observed": 2, "expected": 1.0, "inputs": 4, "alpha": 0.25, "indices": [1, 3]}
    assert coupled_exceedances(table, ["certified_tight"], alpha=0.25) is None


def test_a_censored_estimate_contradicts_no_certificate():
    """A censored estimate is the largest radius tried, at which the input was still robust: a lower
    limit on its margin, so a larger certificate (deterministic or coupled) is no violation; an
    estimate the attack reached is an upper one, so the same certificate above it is."""
    import pandas as pd

    from lipvae.evaluation import coupled_exceedances, soundness_violations

    table = pd.DataFrame({"index": [0, 1, 2, 3], "estimated": [0.5, 0.5, 0.5, 2.0],
                          "censored": [True, False, True, False],
                          "certified_tight": [0.9, 0.9, 0.4, 1.0], "certified_coupled": [0.9, 0.9, 0.4, 2.5]})
    assert soundness_violations(table, ["certified_tight"]) == [1]
    assert coupled_exceedances(table, ["certified_coupled"], alpha=0.1)["indices"] == [1, 3]
    assert soundness_violations(table.drop(columns="censored"), ["certified_tight"]) == [0, 1]  # no column: none censored


def test_the_scatter_draws_censored_estimates_open(monkeypatch, tmp_path):
    """certified_vs_estimated.png: a censored point may lie above the diagonal, so it is drawn
    apart (an open marker, labelled as a lower limit) from the points that must lie below it."""
    import pandas as pd

    from lipvae import plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.setdefault("fig", fig) and path)
    table = pd.DataFrame({"index": [0, 1, 2], "estimated": [1.0, 2.0, 3.0], "censored": [False, True, False],
                          "certified_tight": [0.5, 2.5, 1.0]})
    plots.save_margin_scatter(table, ["certified_tight"], tmp_path / "s.png")
    filled, open_ = drawn["fig"].axes[0].collections[:2]
    assert filled.get_offsets().tolist() == [[1.0, 0.5], [3.0, 1.0]] and open_.get_offsets().tolist() == [[2.0, 2.5]]
    assert len(open_.get_facecolor()) == 0 and "censored" in open_.get_label()


def test_the_aggregate_posterior_of_unlabelled_data_has_no_class_colours(monkeypatch, tmp_path):
    """Fig. 6 colours the latent means by class; data without labels (-1: an image folder without
    class folders, a tensor file without labels) is one colour and has no class colour bar."""
    from lipvae import plots
    from lipvae.vae import VAE

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.append(fig) or path)
    torch.manual_seed(0)
    vae = VAE(input_shape=(16,), latent_dim=2, hidden=(8,))
    x = torch.rand(20, 16)
    plots.save_aggregate_posterior(vae, x, torch.full((20,), -1), tmp_path / "a.png")
    plots.save_aggregate_posterior(vae, x, torch.arange(20) % 3, tmp_path / "b.png")
    (unlabelled,), (labelled, bar) = (fig.axes for fig in drawn)
    assert unlabelled.collections[0].get_array() is None  # one colour, no class mapping
    assert len({tuple(c) for c in unlabelled.collections[0].get_facecolor()}) == 1
    assert sorted(set(labelled.collections[0].get_array().tolist())) == [0, 1, 2] and bar.get_ylabel() == "class"


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_inputs_of_any_channel_count_are_drawn(channels, tmp_path):
    """Reconstructions, prior samples and the latent attack draw inputs of the data's shape: grey,
    RGB, RGBA (without alpha), and other channel counts side by side in grey (a 2-channel tensor
    file crashed matplotlib after the whole evaluation)."""
    from lipvae.plots import as_image, save_prior_samples, save_reconstructions
    from lipvae.vae import VAE

    shape = (channels, 4, 6)
    v = torch.arange(channels * 24, dtype=torch.float32) / (channels * 24)
    img = as_image(v, shape)
    planes = v.reshape(shape)
    if channels in (3, 4):
        assert img.shape == (4, 6, 3) and np.array_equal(img, planes[:3].permute(1, 2, 0).numpy())
    else:
        assert img.shape == (4, 6 * channels)
        assert all(np.array_equal(img[:, 6 * c:6 * (c + 1)], planes[c].numpy()) for c in range(channels))
    torch.manual_seed(0)
    vae = VAE(input_shape=shape, latent_dim=2, hidden=(8,))
    save_reconstructions(vae, torch.rand(3, channels * 24), tmp_path / "r.png")
    save_prior_samples(vae, tmp_path / "p.png", n=2)
    assert (tmp_path / "r.png").is_file() and (tmp_path / "p.png").is_file()


def _snapshot(folder):
    """Every file below ``folder`` and its bytes (the lock file aside: a lock, not content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lipvae.lock"}


class _FullDisk:
    """Makes the ``at``-th file opened for writing (by ``open`` or ``os.open``) fail with ENOSPC."""

    def __init__(self, monkeypatch, at: int):
        import builtins
        import errno
        import io
        import os

        self.count, self.at, self.hit = 0, at, False
        real_open, real_os_open = builtins.open, os.open

        def check(writing: bool):
            if writing:
                self.count += 1
                if self.count == self.at:
                    self.hit = True
                    raise OSError(errno.ENOSPC, "No space left on device")

        def fake_open(file, mode="r", *args, **kwargs):
            check(any(c in mode for c in "wax+"))
            return real_open(file, mode, *args, **kwargs)

        def releasing(path, flags) -> bool:
            """Emptying the lock of this process's own PID (lipvae.runfolder.release): frees space, never needs it."""
            if os.path.basename(path) != ".lipvae.lock" or not flags & os.O_TRUNC or not os.path.isfile(path):
                return False
            with real_open(path) as f:
                return f.read() == f"{os.getpid()}\n"

        def fake_os_open(path, flags, *args, **kwargs):
            check(bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) and not releasing(path, flags))
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)


@pytest.mark.slow
def test_replace_on_a_full_disk_at_every_write_leaves_the_run_byte_identical(run, capsys, monkeypatch):
    """--replace under ENOSPC at the 1st, 2nd, ... write: each time one line naming the run, and
    the run folder exactly as before; then, with room, the replacement goes through (issue 27)."""
    before = _snapshot(run)
    args = [str(run), "certify.forms=[tight,cantelli]", "margins.certified_inputs=5", "--replace"]  # reuses the attack: quick
    at = 1
    while True:
        with monkeypatch.context() as m:
            disk = _FullDisk(m, at)
            code = evaluate_main(args)
        err = capsys.readouterr().err
        if not disk.hit:
            break
        assert code == 2, at
        assert err.strip().splitlines() == [
            f"error: no space left on the device while evaluating {run} (No space left on device); the run is as it"
            " was: free some space and run the command again"], at
        assert _snapshot(run) == before, f"the run changed when write {at} failed"
        at += 1
    assert code == 0 and at > 5  # every write of a complete replacement was made to fail once
    r = json.loads((run / "results.json").read_text())
    assert r["certified"]["form"] == "tight" and "cantelli" in r["certified"]["by_r_p_form"]["r8_p0.5"]
    assert "certified_cantelli" in pd.read_csv(run / "certified_margins.csv").columns
    _consistent(run, r)


def test_a_malformed_stored_config_is_one_line(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model: {kind: [lipschitz\n")
    (tmp_path / "frozen_model.pt").write_bytes(b"")
    assert evaluate_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config: {tmp_path / '.hydra' / 'config.yaml'} is not valid YAML (line ") and "\n" not in err


def test_evaluate_can_be_interrupted_when_started_with_sigint_ignored(monkeypatch, capsys):
    """A script's `lipvae.evaluate ... &` inherits SIGINT ignored; the evaluation must still stop
    on it, and the caller's handlers come back afterwards (issue 27)."""
    import os
    import signal

    import lipvae.evaluate as ev

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT was ignored")

    monkeypatch.setattr(ev, "reevaluate", interrupted)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert ev.main(["some/run"]) == 130
        assert "error: interrupted" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_a_corrupt_or_foreign_record_is_evaluated_afresh_and_never_replaced(run, capsys):
    """evaluate reads any folder: an unreadable or foreign results.json is not reused (one log line)
    and cannot be --replaced (one error line), instead of a traceback (issue 27)."""
    for text in ("{", json.dumps({"status": "completed", "config": [1], "estimated": "x"})):
        (run / "results.json").write_text(text)
        assert evaluate_main([str(run), "margins.attacked_inputs=2", "attack.steps=5", "attack.starts=1"]) == 0
        assert capsys.readouterr().out.startswith("evaluation written to ")
        assert evaluate_main([str(run), "--replace"]) == 2
        assert "holds no completed run" in capsys.readouterr().err
        assert (run / "results.json").read_text() == text


@pytest.mark.slow
def test_a_moved_runs_data_is_found_with_data_root_and_still_checked(run, tmp_path, capsys, monkeypatch, synthetic_root):
    moved = shutil.copytree(synthetic_root / "mnist", tmp_path / "moved" / "mnist")
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(tmp_path / "nowhere"))
    args = [str(run), "margins.certified_inputs=5", "margins.attacked_inputs=2", "attack.steps=5"]
    assert evaluate_main(args) == 2  # the data is not where the run found it
    capsys.readouterr()
    assert evaluate_main([*args, f"data.root={moved}"]) == 0
    assert "cannot check" not in capsys.readouterr().err
    import gzip

    images = moved / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(images.read_bytes()))
    raw[16 + 14 * 28 + 14] ^= 0xFF  # one pixel of the first test image (after the 16-byte header)
    images.write_bytes(gzip.compress(bytes(raw)))
    assert evaluate_main([*args, f"data.root={moved}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mnist/test file that differs from the one the run read" in err[0]


@pytest.mark.slow
def test_a_record_without_digests_is_evaluated_after_a_warning(run, capsys):
    record = json.loads((run / "results.json").read_text())
    record["data"] = {k: v for k, v in record["data"].items() if k not in ("sources", "indices")}
    (run / "results.json").write_text(json.dumps(record))
    assert evaluate_main([str(run), "margins.certified_inputs=5", "margins.attacked_inputs=2", "attack.steps=5"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no digests of its data" in warnings[0] and "would go unnoticed" in warnings[0]
    record["data"]["sources"] = ["mnist/test"]
    (run / "results.json").write_text(json.dumps(record))
    assert evaluate_main([str(run), "margins.certified_inputs=5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: data.sources: ")


@pytest.mark.slow
def test_a_replace_stopped_between_its_renames_is_finished_by_the_next_command(run, capsys, monkeypatch):
    """--replace killed between two renames left new tables beside the old results.json: the
    staged switch is journalled and the next command on the run rolls it forward."""
    import os
    from pathlib import Path

    import lipvae.evaluate as ev

    real, calls = os.replace, []

    def stop_midway(src, dst):
        if Path(dst).parent == run and Path(src).parent.name.startswith(".replacing-"):
            calls.append(dst)  # a rename of the switch itself
        if len(calls) == 2:
            raise KeyboardInterrupt("SIGTERM between two renames")
        return real(src, dst)

    monkeypatch.setattr(ev.os, "replace", stop_midway)
    with pytest.raises(KeyboardInterrupt):
        ev.reevaluate(run, ["certify.forms=[tight,cantelli]", "margins.certified_inputs=5"], replace=True, progress=False)
    monkeypatch.setattr(ev.os, "replace", real)
    assert list(run.glob(".replacing-*/READY"))  # the journal: staged whole, switch under way
    assert evaluate_main([str(run), "margins.certified_inputs=5"]) == 0  # any later command on the run finishes it
    assert not list(run.glob(".replacing-*"))
    r = json.loads((run / "results.json").read_text())
    assert "cantelli" in r["certified"]["by_r_p_form"]["r8_p0.5"] and r["evaluation"]["replaced"]
    _consistent(run, r)


def test_evaluate_exits_143_on_sigterm_as_training_does(monkeypatch, capsys):
    import os
    import signal

    import lipvae.evaluate as ev

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(ev, "reevaluate", terminated)
    assert ev.main(["some/run"]) == 143
    assert "error: interrupted" in capsys.readouterr().err


def test_asking_to_attack_more_inputs_than_the_test_split_holds_is_said(tmp_path, caplog):
    """margins.attacked_inputs beyond the test split attacks every test input, and says so."""
    from conftest import SMOKE, composed
    from lipvae.build import build_vae
    from lipvae.data import TensorBatches
    from lipvae.evaluation import evaluate

    cfg = composed(*SMOKE, "model.hidden=[8,8]", "model.latent_dim=2", "margins.attacked_inputs=5",
                   "margins.certify=false", "attack.steps=2", "attack.starts=1", "attack.samples=4")
    torch.manual_seed(0)
    vae = build_vae(cfg.model, (1, 4, 4)).freeze().eval()
    test = TensorBatches(torch.rand(3, 16, generator=torch.Generator().manual_seed(1)), torch.arange(3), torch.arange(3))
    with caplog.at_level(logging.INFO, logger="lipvae"):
        ev = evaluate(vae, test, cfg, tmp_path, seed=0, progress=False)
    assert ev.estimated["num_inputs"] == 3 and len(pd.read_csv(tmp_path / "margins.csv")) == 3
    assert "margins.attacked_inputs=5, but the test split holds only 3: all of them are attacked" in caplog.text


@pytest.mark.slow
def test_a_run_on_a_relative_data_path_is_reevaluated_from_another_folder(tmp_path, monkeypatch, caplog):
    """data.path=my.npy, trained in one folder and re-evaluated from another: the run's recorded
    absolute location is read (its digests checked as always); a relative path given anew is not
    replaced."""
    from conftest import run_cli

    (tmp_path / "work").mkdir()
    np.save(tmp_path / "work" / "my.npy", np.random.default_rng(0).integers(0, 256, (60, 1, 8, 8), dtype=np.uint8))
    proc = run_cli("tier=smoke", "trainer.enable_progress_bar=false", "data=tensor_file", "data.path=my.npy", "model.hidden=[8,8]", "certify.r=[4]", "attack.r=4",
                   "margins.attacked_inputs=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="lipvae"):
        assert evaluate_main([str(tmp_path / "run")]) == 0
    assert f"data.path: my.npy is not found from {tmp_path}; reading the run's recorded {tmp_path / 'work' / 'my.npy'}" \
        in caplog.text
    assert evaluate_main([str(tmp_path / "run"), "data.path=other.npy"]) == 2  # given anew: taken as given
