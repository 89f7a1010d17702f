import json
from pathlib import Path

import pytest

from conftest import run_cli

SMOKE = ["experiment=smoke", "data.resplit=true", "logger.wandb.enabled=false"]


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def check_schema(r: dict) -> None:
    assert r["schema_version"] == 1 and r["status"] == "completed"
    for key in ("config", "model", "lipschitz", "data", "metrics", "certified", "estimated", "timings"):
        assert key in r
    assert r["data"]["split"] == "resplit-test"
    assert r["data"]["num_train"] + r["data"]["num_val"] + r["data"]["num_test"] == 600
    for key in ("test_elbo", "test_log_likelihood", "test_kl"):
        assert isinstance(r["metrics"][key], float)
    assert r["metrics"]["test_kl"] > 0
    assert r["timings"]["total_s"] >= r["timings"]["fit_s"] > 0


@pytest.mark.slow
def test_single_lipschitz_run(tmp_path):
    proc = run_cli(*SMOKE, "enc_L=4", "dec_L=6", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = load(tmp_path)
    check_schema(r)
    assert r["model"] == {
        "kind": "lipschitz",
        "latent_dim": 10,
        "encoder_std": {"mode": "learned", "gamma": None, "max_norm": None},
        "beta": 1.0,
        "likelihood": "continuous_bernoulli",
    }
    nominal, measured = r["lipschitz"]["nominal"], r["lipschitz"]["measured"]
    assert nominal == {"encoder_mean": 4.0, "encoder_std": 4.0, "decoder": 6.0}
    assert measured["encoder_mean"] == pytest.approx(4.0, rel=1e-3)
    assert measured["encoder_std"] == pytest.approx(1.0, rel=1e-3)  # sigmoid head: 4 / 4
    assert measured["decoder"] == pytest.approx(1.5, rel=1e-3)
    assert r["metrics"]["final_phase"] == "done" and r["metrics"]["epochs"] == 2
    for f in ("reconstructions.png", "frozen_model.pt", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (tmp_path / f).is_file(), f


@pytest.mark.slow
def test_standard_beta_vae_with_fixed_std(tmp_path):
    proc = run_cli(
        *SMOKE, "model=standard", "model.beta=5", "model.encoder_std.mode=fixed", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = load(tmp_path)
    check_schema(r)
    assert r["lipschitz"] is None and r["model"]["kind"] == "standard"
    assert r["model"]["beta"] == 5.0 and r["model"]["encoder_std"]["gamma"] == 0.1
    assert r["metrics"]["epochs"] == 1  # no fine-tune phase for a standard VAE


@pytest.mark.slow
def test_multirun_over_lipschitz_grid(tmp_path):
    proc = run_cli(*SMOKE, "model=lipschitz", "enc_L=5,7", f"hydra.sweep.dir={tmp_path}", "-m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/results.json"))
    assert len(runs) == 2
    got = {}
    for run in runs:
        r = load(run)
        check_schema(r)
        got[r["config"]["enc_L"]] = r["lipschitz"]["measured"]["encoder_mean"]
    assert got == {5.0: pytest.approx(5.0, rel=1e-3), 7.0: pytest.approx(7.0, rel=1e-3)}


def test_bad_input_is_one_line(tmp_path):
    proc = run_cli(*SMOKE, "enc_L=-1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.lipschitz.encoder_mean: got -1; accepted: a positive number"
    )
    assert "Traceback" not in proc.stderr
    r = load(tmp_path)
    assert r["status"] == "failed" and "encoder_mean" in r["error"]


@pytest.mark.slow
def test_wandb_offline_by_default_records_run(tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = compose("config")
    assert default.logger.wandb.enabled and default.logger.wandb.mode == "offline"
    proc = run_cli(  # the smoke preset turns W&B off; switch it back on
        "experiment=smoke", "data.resplit=true", "logger.wandb.enabled=true", f"hydra.run.dir={tmp_path}",
        env={"WANDB_MODE": "", "WANDB_API_KEY": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    assert b"results/test_elbo" in blob and b"val/loss" in blob
    assert b"results/certified_mean" in blob and b"certified_margins" in blob
