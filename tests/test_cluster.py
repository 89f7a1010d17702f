"""The SLURM path, end to end on this machine: a stand-in sbatch/srun (tests/fake_slurm/) that
records the submitted script and runs its array tasks here, as a cluster's nodes would."""

import json
import os

import pytest

from conftest import PROJECT, SMOKE, run_cli

FAKE = PROJECT / "tests" / "fake_slurm"


@pytest.mark.slow
def test_a_slurm_sweep_is_submitted_without_a_gpu_here_and_each_job_checks_its_own_node(tmp_path):
    """(array parallelism is min(array_parallelism, jobs).) Submitted from a machine without CUDA (a login node): trainer.accelerator=gpu is not refused
    at submission; each job checks the device where it runs. Here the 'node' has no GPU either, so
    the gpu job refuses itself in one line and the auto job trains, certifies and attacks."""
    log = tmp_path / "slurm"
    log.mkdir()
    env = {"PATH": f"{FAKE}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log)}
    proc = run_cli(*SMOKE, "trainer.accelerator=gpu,auto", "hydra/launcher=slurm", "resume=auto",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", "-m", env=env, process=True, timeout=300)
    script = (log / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=240"):
        assert line in script, line  # array parallelism, GPU partition, requeue signal before the time limit
    args = (log / "sbatch_args").read_text().split()
    assert "-m submitit.core._submit" in script and len(args) == 1 and args[0].endswith(".sh")
    assert proc.returncode == 1, proc.stderr[-3000:]  # one job refused: the sweep says so
    jobs = sorted((tmp_path / "sweep").glob("[0-9]_*"))
    assert len(jobs) == 2
    refused = [line for line in (proc.stdout + proc.stderr).splitlines() if "refused by this multirun" in line]
    assert len(refused) == 1 and "trainer.accelerator: got 'gpu', but no CUDA device is visible" in refused[0]
    done = [json.loads((j / "results.json").read_text()) for j in jobs if (j / "results.json").is_file()]
    assert [r["status"] for r in done] == ["completed"] and done[0]["soundness_violations"] == 0


@pytest.mark.slow
def test_a_tiny_optuna_front_returns_the_named_objectives_and_the_report_draws_it(tmp_path):
    """hydra/sweeper=front with objective=[test_log_likelihood,certified_mean]: each trial returns
    those two numbers of its results.json, Optuna's front holds them, the report draws it."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    from lipvae.report import main as report_main

    sweep = tmp_path / "study"
    proc = run_cli(*SMOKE, "hydra/sweeper=front", "objective=[test_log_likelihood,certified_mean]",
                   "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.population_size=2", "margins.attacked_inputs=2",
                   f"hydra.sweep.dir={sweep}", "-m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {(round(r["metrics"]["test_log_likelihood"], 4), round(r["certified"]["mean"], 6))
              for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    assert len(trials) == 2
    front = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    assert front and all((round(s["values"][0], 4), round(s["values"][1], 6)) in trials for s in front)
    assert report_main([str(sweep)]) == 0 and (sweep / "optuna_front.png").is_file()
    assert "optuna_front.png" in (sweep / "report.md").read_text()


def test_the_objective_names_what_a_run_returns():
    from lipvae.results import Results
    from lipvae.train import objective_value

    r = Results(status="completed", metrics={"test_elbo": -5.0, "test_log_likelihood": -4.0},
                certified={"mean": 0.3}, estimated={"mean": 2.5}, soundness_violations=0)
    assert objective_value(r, "test_elbo") == -5.0
    assert objective_value(r, ["test_log_likelihood", "certified_mean", "soundness_violations"]) == [-4.0, 0.3, 0.0]
    standard = Results(status="completed", metrics={"test_elbo": -5.0}, certified=None)
    import math

    assert math.isnan(objective_value(standard, "certified_mean"))
    assert objective_value(r, "certified_mean_above_floor", -10.0) == 0.3  # the floor reached
    assert objective_value(r, "certified_mean_above_floor", -3.0) == -math.inf  # below it


@pytest.mark.slow
def test_a_submitit_local_sweep_runs_its_jobs_as_local_processes(tmp_path):
    """hydra/launcher=submitit_local: the cluster path's jobs, run here (a dry run of a SLURM sweep)."""
    proc = run_cli(*SMOKE, "enc_L=5", "hydra/launcher=submitit_local", "margins.attacked_inputs=2",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", "-m", process=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = (tmp_path / "sweep").glob("0_*")
    r = json.loads((job / "results.json").read_text())
    assert r["status"] == "completed" and r["soundness_violations"] == 0
    assert list((tmp_path / "sweep" / ".submitit").rglob("*_result.pkl"))  # submitit ran it


def test_train_help_explains_its_arguments():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("python -m lipvae.train [group=option ...] [key=value ...] [-m]")
    for words in ("enc_L, dec_L", "model/arch=conv", "data=mnist|fashion_mnist", "resume=true|auto", "docs/usage.md"):
        assert words in proc.stdout, words
