"""Sweeps, experiment presets, reports and W&B grouping."""

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import composed, every_kth_fast
from lipvae.report import main as report_main

@pytest.mark.slow
def test_report_has_one_row_per_run_and_lists_broken_ones(sweep):
    assert report_main([str(sweep)]) == 0
    table = pd.read_csv(sweep / "results.csv")
    done = table[table.status == "completed"].sort_values("enc_L")
    assert list(done.enc_L) == [5.0, 7.0]
    for _, row in done.iterrows():
        r = json.loads((sweep / row.run / "results.json").read_text())
        assert row.estimated_mean == pytest.approx(r["estimated"]["mean"])
        assert row.certified_mean == pytest.approx(r["certified"]["mean"])
        assert row.test_log_likelihood == pytest.approx(r["metrics"]["test_log_likelihood"])
        assert row.soundness_violations == 0
    broken = dict(zip(table.run, table.status))
    assert broken["9_killed"].startswith("missing results.json")
    assert broken["8_torn"].startswith("unreadable results.json")
    md = (sweep / "report.md").read_text()
    assert "## Runs not included" in md and "`9_killed`" in md and "`8_torn`" in md
    metrics = json.loads(next(sweep.glob("*_lipschitz_*/results.json")).read_text())["metrics"]
    epochs, stop = metrics["epochs"], metrics["stop_reason"]
    assert stop in ("finetune_converged", "finetune_max_epochs")
    # compact table: model, then epochs and why training ended
    assert f"| L=5 | {epochs} | {stop} |" in md and f"| L=7 | {epochs} | {stop} |" in md
    assert "Soundness violations (certified > estimated): 0 in 2 checked run(s) of 2 completed" in md
    assert f"- **epochs trained**: {epochs}\n" in md  # the same for both runs: one number, not "2–2"
    for line in ("- **tier**: smoke", "- **data**: mnist resplit-test (432/48/120 train/val/test)",
                 "- **estimated margins**: r=8, p=0.5, 6 inputs, 20 samples × 2 starts, 10 steps, bisection"):
        assert line in md, line
    code = json.loads(next(sweep.glob("*_lipschitz_*/results.json")).read_text())["run"]["code"]
    assert f"- **code**: {code}" in md and len(code) >= 12
    page = (sweep / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "src='http" not in page and "<details>" in page
    for fig in ("estimated_margins.png", "likelihood_vs_robustness.png", "certified_vs_estimated.png"):
        assert (sweep / fig).stat().st_size > 1000
    assert "Theorem 1" not in md  # the data-free figure only on request (--tightness)
    # each run links to its folder and its own figures, by paths relative to the report
    for run in done.run:
        assert f'<a href="{run}/">' in page and f'<a href="{run}/reconstructions.png">' in page
        assert (sweep / run / "reconstructions.png").is_file()
    assert "None" not in md


@pytest.mark.slow
def test_sweep_runs_share_a_wandb_group(sweep):
    blobs = [p.read_bytes() for p in sweep.glob("*/wandb/offline-run-*/run-*.wandb")]
    assert len(blobs) == 2
    group = "_".join(sweep.parts[-3:]).encode()
    assert all(group in b for b in blobs)
    assert all(b"results/estimated_mean" in b and b"results/certified_mean" in b for b in blobs)


def test_report_on_folder_without_runs_is_one_line(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: report: no runs (folders with .hydra/ or results.json) below {tmp_path}"


@pytest.mark.parametrize(
    "experiment,tier,variant,expect",
    every_kth_fast([
        ("fig5", "quick", "lipschitz_L7", dict(kind="lipschitz", enc_L=7.0, hidden=[256, 256])),
        ("fig5", "paper", "standard", dict(kind="standard", lr=1e-3, hidden=[512, 512])),
        ("fig5", "cpu", "lipschitz_L10", dict(kind="lipschitz", enc_L=10.0, lr=1e-3, hidden=[256, 256])),
        ("fig5", "cpu", "standard", dict(kind="standard", lr=1e-3, hidden=[256, 256])),
        ("fig6_7", "quick", "lipschitz_L5_beta5", dict(kind="lipschitz", beta=5.0, latent_dim=2)),
        ("fig6_7", "cpu", "lipschitz_L5_beta5", dict(kind="lipschitz", beta=5.0, latent_dim=2, lr=1e-3, hidden=[256, 256])),
        ("fig6_7", "official", "standard", dict(kind="standard", latent_dim=2, lr=1e-3, hidden=[256, 256])),
    ], 3),
)
def test_experiment_presets_compose(experiment, tier, variant, expect):
    from lipvae.config import validate

    cfg = composed(f"experiment={experiment}", f"tier={tier}", f"variant={variant}")
    validate(cfg)
    got = {"kind": cfg.model.kind, "enc_L": cfg.enc_L, "hidden": list(cfg.model.hidden), "lr": cfg.module.lr,
           "beta": cfg.model.beta, "latent_dim": cfg.model.latent_dim}
    assert {k: got[k] for k in expect} == expect


FIGURES = ("fig3", "fig4", "fig5", "fig5_seeds", "fig5_standard", "fig6_7")
TIERS = ("smoke", "quick", "laptop", "cpu", "official", "converged", "paper")


def test_a_figure_is_one_file_and_every_tier_composes_with_it():
    """Presets are two independent groups: a figure (experiment) at any size (tier), not one file per pair."""
    from lipvae.config import validate

    conf = Path(__file__).resolve().parents[1] / "conf"
    assert sorted(p.stem for p in (conf / "experiment").glob("*.yaml")) == sorted(FIGURES)
    assert sorted(p.stem for p in (conf / "tier").glob("*.yaml")) == sorted(TIERS)
    # the groups are independent: every tier with one figure, every figure at the two tiers that read its budget
    pairs = [("fig5", tier) for tier in TIERS] + [(f, t) for f in FIGURES if f != "fig5" for t in ("cpu", "official")]
    for figure, tier in pairs:
        cfg = composed(f"experiment={figure}", f"tier={tier}")
        validate(cfg, machine=False)
        if tier in ("cpu", "official"):  # the figure's own wall-clock budget at these tiers
            budget = cfg.budget_minutes[tier]
            assert cfg.trainer.max_time == budget and budget > 0, (figure, tier)
    # the tiers' sizes: the default run's budget, the paper's widths, the converged tier without a budget
    assert (composed().trainer.max_time, composed("tier=laptop").trainer.max_epochs) == (7, 10)
    assert list(composed("experiment=fig5", "tier=paper").model.hidden) == [512, 512]
    assert composed("experiment=fig5", "tier=converged").trainer.max_time is None
    assert composed("experiment=fig5_standard", "tier=official").trainer.max_time == 25  # its own, over fig5's 8


@pytest.mark.parametrize(
    "experiment,override,expect",
    every_kth_fast([
        ("fig3", "model.encoder_std.gamma=0.4", dict(mode="fixed", gamma=0.4, max_time=6.0, data="mnist")),
        ("fig4", "data=fashion_mnist", dict(mode="learned", gamma=0.1, max_time=18.0, data="fashion_mnist")),
        ("fig4", "model.encoder_std.mode=fixed", dict(mode="fixed", gamma=0.1, max_time=18.0, data="mnist")),
        ("fig5", "enc_L=7", dict(mode="learned", gamma=0.1, max_time=18.0, data="mnist")),
    ], 4),
)
def test_cpu_tier_presets_share_one_set_of_changes(experiment, override, expect):
    """Every figure at tier=cpu takes conf/tier/cpu.yaml's changes (256-256, lr 1e-3, early stopping, best epoch,
    no W&B), its own budget, and keeps its figure's own grid and settings."""
    from lipvae.config import validate

    cfg = composed(f"experiment={experiment}", "tier=cpu", override)
    validate(cfg)
    assert (list(cfg.model.hidden), cfg.module.lr, cfg.model.kind) == ([256, 256], 1e-3, "lipschitz")
    assert (cfg.callbacks.early_stopping.patience, cfg.evaluate, list(cfg.logger)) == (5, "best", ["csv"])
    got = dict(mode=cfg.model.encoder_std.mode, gamma=cfg.model.encoder_std.gamma, max_time=cfg.trainer.max_time,
               data=cfg.data.name)
    assert got == expect
    grid = composed(f"experiment={experiment}", "tier=cpu", hydra=True).hydra
    assert grid.sweep.dir.startswith(f"outputs/multirun/{experiment}/")
    plain = composed(f"experiment={experiment}", hydra=True).hydra
    assert grid.sweeper.params == plain.sweeper.params  # the tier changes the size, not the grid


@pytest.mark.slow  # composes every grid
def test_sweep_grids_and_launchers_compose():
    cfg = composed("experiment=fig5", hydra=True)
    assert cfg.hydra.sweeper.params.variant.split(",")[-1] == "standard"
    cfg = composed("experiment=fig3", "tier=quick", hydra=True)
    assert cfg.model.encoder_std.mode == "fixed" and "enc_L" in cfg.hydra.sweeper.params
    assert "Joblib" in composed("hydra/launcher=joblib", hydra=True).hydra.launcher._target_
    slurm = composed("hydra/launcher=slurm", hydra=True).hydra.launcher
    assert "Slurm" in slurm._target_ and slurm.gpus_per_node == 1


def _fake_run(folder, status="completed", violations=0, kind="lipschitz", text=None):
    folder.mkdir(parents=True)
    if text is not None:
        (folder / "results.json").write_text(text)
        return
    results = {"status": status, "model": {"kind": kind}, "soundness_violations": violations,
               "metrics": {"epochs": 3}, "estimated": None, "error": "boom"}
    (folder / "results.json").write_text(json.dumps(results))


def test_report_help_names_the_command_and_the_exit_statuses_the_tests_check(capsys):
    with pytest.raises(SystemExit) as stop:
        report_main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lipvae.report ") and "``" not in out
    assert "exit status: 0 written, 1 runs found but none completed, 2 bad input or no runs" in " ".join(out.split())


def test_report_with_no_completed_run_exits_1(tmp_path, capsys):
    _fake_run(tmp_path / "a", status="failed")
    _fake_run(tmp_path / "b", text="null")
    assert report_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: report: none of the 2 run(s) below {tmp_path} completed") and "\n" not in err
    md = (tmp_path / "report.md").read_text()
    assert "`a`: failed: boom" in md and "`b`: unreadable results.json (a JSON NoneType, not an object)" in md


@pytest.mark.slow
def test_report_counts_soundness_only_over_checked_runs(tmp_path):
    _fake_run(tmp_path / "checked", violations=0)
    _fake_run(tmp_path / "unchecked", violations=None)
    _fake_run(tmp_path / "std", violations=None, kind="standard")
    assert report_main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Soundness violations (certified > estimated): 0 in 1 checked run(s) of 3 completed" in md


@pytest.mark.slow
def test_report_says_a_coupled_certificate_holds_with_probability(tmp_path):
    """The coupled form as the primary certificate: the report, results.csv and the soundness
    line say it holds with probability 1 - alpha and count its exceedances apart (issue 27)."""
    folder = tmp_path / "coupled"
    folder.mkdir()
    certified = {"r": 8.0, "p": 0.5, "form": "coupled", "num_inputs": 100, "mean": 0.6, "median": 0.6, "min": 0.5,
                 "fraction_certified": 1.0, "global_margin": None, "holds_with_probability": 0.999,
                 "coupled": {"samples": 2000, "alpha": 0.001, "seed": 0}}
    results = {"status": "completed", "model": {"kind": "lipschitz"}, "soundness_violations": 0,
               "coupled_exceedances": {"observed": 1, "expected": 0.1, "inputs": 100, "alpha": 0.001, "indices": [4]},
               "metrics": {"epochs": 3}, "certified": certified, "estimated": None}
    (folder / "results.json").write_text(json.dumps(results))
    _fake_run(tmp_path / "tight", violations=0)
    assert report_main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "coupled form, 100 inputs, each holding with probability >= 0.999 over the certifier's samples (not a proof)" in md
    assert "Coupled certificates (probabilistic) above the estimated margin: 1, against about 0.1 expected" in md
    assert "Soundness violations (certified > estimated): 0 in 2 checked run(s)" in md
    table = pd.read_csv(tmp_path / "results.csv").set_index("run")
    assert table.loc["coupled", "certified_holds_with_probability"] == 0.999
    assert "0.999" in (tmp_path / "report.html").read_text()


def test_report_out_that_is_a_file_is_one_line(tmp_path, capsys):
    _fake_run(tmp_path / "run")
    (tmp_path / "out.txt").write_text("x")
    assert report_main([str(tmp_path), "--out", str(tmp_path / "out.txt")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --out: got")


def test_paired_margins_against_the_standard_vae(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("paired", Path(__file__).parents[1] / "sweeps" / "paired_margins.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)

    def make(name, kind, L, margins):
        run = tmp_path / name
        run.mkdir()
        pd.DataFrame({"index": range(len(margins)), "estimated": margins}).to_csv(run / "margins.csv", index=False)
        results = {"status": "completed", "model": {"kind": kind}, "config": {"enc_L": L},
                   "estimated": {"table": "margins.csv"}}
        (run / "results.json").write_text(json.dumps(results))

    make("0_std", "standard", 5.0, [1.0, 2.0, 3.0, 4.0])
    make("1_L5", "lipschitz", 5.0, [2.0, 2.5, 2.0, 5.0])  # differences +1, +0.5, -1, +1
    make("2_L10", "lipschitz", 10.0, [0.5, 1.5, 2.5, 3.5])  # -0.5 everywhere
    table = paired.compare(tmp_path, resamples=2000).set_index("L")
    assert table.loc["5", "mean_difference"] == pytest.approx(0.375)
    assert table.loc["5", "larger_on"] == 3 and table.loc["10", "larger_on"] == 0
    assert table.loc["10", "ci_low"] == pytest.approx(-0.5) and table.loc["10", "ci_high"] == pytest.approx(-0.5)
    assert -1 <= table.loc["5", "ci_low"] < 0.375 < table.loc["5", "ci_high"] <= 1
    make("3_L7", "lipschitz", 7.0, [1.0] * 4)
    results = json.loads((tmp_path / "3_L7" / "results.json").read_text())
    results["estimated"]["r"] = 4.0  # margins at another r: nothing to pair it with
    (tmp_path / "3_L7" / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="found 0 completed standard VAE runs with seed 0 measured on the same inputs"):
        paired.compare(tmp_path, resamples=10)


def test_paired_margins_pair_each_seed_with_its_own_standard_vae(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("paired", Path(__file__).parents[1] / "sweeps" / "paired_margins.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)

    def make(folder, kind, L, seed, margins):
        run = tmp_path / folder
        run.mkdir(parents=True)
        pd.DataFrame({"index": range(len(margins)), "estimated": margins}).to_csv(run / "margins.csv", index=False)
        results = {"status": "completed", "model": {"kind": kind}, "config": {"enc_L": L, "seed": seed},
                   "estimated": {"table": "margins.csv"}}
        (run / "results.json").write_text(json.dumps(results))

    make("std/0", "standard", 5.0, 0, [1.0, 1.0, 1.0])
    make("std/1", "standard", 5.0, 1, [3.0, 3.0, 3.0])
    make("lip/0", "lipschitz", 8.0, 0, [2.0, 2.0, 2.0])  # +1 against seed 0's standard VAE
    make("lip/1", "lipschitz", 8.0, 1, [2.0, 2.0, 2.0])  # -1 against seed 1's
    make("lip/2", "lipschitz", 9.0, 0, [1.5, 1.5, 1.5])
    make("lip/3", "lipschitz", 9.0, 1, [3.5, 3.5, 3.5])
    table = paired.compare(tmp_path / "std", tmp_path / "lip", resamples=500)
    got = {(r.L, r.seed): r.mean_difference for r in table.itertuples()}
    assert got == {("8", 0): 1.0, ("8", 1): -1.0, ("9", 0): 0.5, ("9", 1): 0.5}
    summary = paired.summarise(table).set_index("L")
    assert summary.loc["8", "verdict"] == "undecided" and summary.loc["9", "verdict"] == "more robust"
    assert paired.undecided_arms(table) == []  # every seed's interval is a point away from 0
    wide = table.assign(ci_low=table.mean_difference - 0.75, ci_high=table.mean_difference + 0.75)
    assert paired.undecided_arms(wide) == ["lipschitz_L9"]  # 0.5 ± 0.75 includes 0; ±1 ± 0.75 does not
    assert (summary.loc["8", "lowest"], summary.loc["8", "highest"]) == (-1.0, 1.0)
    make("extra/std", "standard", 5.0, 0, [0.0, 0.0, 0.0])  # a second seed-0 standard VAE: which one?
    with pytest.raises(SystemExit, match="found 2 completed standard VAE runs with seed 0"):
        paired.compare(tmp_path)
    assert paired.compare(tmp_path, standard=tmp_path / "std", resamples=10).mean_difference.tolist() == [1.0, -1.0, 0.5, 0.5]


def test_fixed_sigma_grid_figure_needs_a_grid(tmp_path):
    from lipvae.report import fig_fixed_sigma_grid

    def row(gamma, L, est):
        return {"model": "lipschitz", "std_mode": "fixed", "gamma": gamma, "enc_L": L, "estimated_mean": est}

    grid = [row(g, L, 10 / L) for g in (0.1, 0.4) for L in (5.0, 10.0)]
    assert fig_fixed_sigma_grid(grid, tmp_path / "grid.png") == tmp_path / "grid.png"
    assert (tmp_path / "grid.png").stat().st_size > 1000
    learned = [{**r, "std_mode": "learned"} for r in grid]
    assert fig_fixed_sigma_grid(learned + grid[:1], tmp_path / "none.png") is None  # one fixed point: no grid


def test_a_sweep_that_refused_a_job_exits_non_zero_and_names_it(tmp_path, caplog):
    """Re-running a sweep into its folder with one job's override changed: the refused job's old
    record says completed, but this multirun did not run it (issue 27)."""
    from omegaconf import OmegaConf

    from lipvae.sweep import SweepSummary, note_refusal

    caplog.set_level("INFO", logger="lipvae")
    for name in ("0_a", "1_b"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps({"status": "completed"}))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    summary = SweepSummary()
    summary.on_multirun_start(config)
    summary.on_multirun_end(config)  # both completed: no exit
    summary.on_multirun_start(config)
    note_refusal(tmp_path / "1_b", "run 1_b differs from this command in enc_L\nmore")
    with pytest.raises(SystemExit) as stop:
        summary.on_multirun_end(config)
    assert stop.value.code == 1
    assert "job 1_b refused by this multirun: run 1_b differs from this command in enc_L" in caplog.text
    assert "1 of 2 jobs completed" in caplog.text
    summary.on_multirun_start(config)  # the next multirun starts clean
    summary.on_multirun_end(config)


@pytest.mark.slow  # the session's trained models (smoke_runs)
def test_a_sweep_ends_with_its_report_unless_told_not_to(tmp_path, smoke_runs, caplog):
    """The sweep's report (as ``python -m lipvae.report <sweep>`` writes it) when the multirun
    ends; none with ``report=false``; one warning line, never a failed sweep, where it cannot be
    written."""
    import shutil

    from omegaconf import OmegaConf

    from lipvae.sweep import SweepSummary

    caplog.set_level("INFO", logger="lipvae")
    sweep = tmp_path / "sweep"
    for run in smoke_runs.values():
        shutil.copytree(run, sweep / run.name)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    SweepSummary(report=False).on_multirun_end(config)
    assert not (sweep / "report.md").exists()
    SweepSummary().on_multirun_end(config)
    md = (sweep / "report.md").read_text()
    assert "4 completed run(s), 0 not usable." in md and (sweep / "report.html").is_file()
    assert f"sweep report: {sweep / 'report.md'}" in caplog.text
    (sweep / "report.md").unlink()
    (sweep / "report.md").symlink_to(tmp_path / "elsewhere.md")  # refused by the report: a warning only
    SweepSummary().on_multirun_end(config)
    assert f"no sweep report ({sweep / 'report.md'}: is a symlink" in caplog.text
    assert f"write it with: python -m lipvae.report {sweep}" in caplog.text
    assert not (tmp_path / "elsewhere.md").exists()


@pytest.mark.parametrize(
    "edit,reason",
    every_kth_fast([
        (lambda r: r.update(soundness_violations=float("nan")), "soundness_violations is nan, not a finite number"),
        (lambda r: r["estimated"].pop("r"), "estimated.r or estimated.p is missing or not a number"),
        (lambda r: r.update(lipschitz={"nominal": {"encoder_mean": "5", "decoder": 5.0}}),
         "lipschitz.nominal.encoder_mean is '5', not a number"),
        (lambda r: r.update(config=None), None),  # null config: reported, with no config fields
        (lambda r: r.update(config=[1, 2]), "config is a list, not an object"),
    ], 5),
)
def test_report_reads_any_record_and_says_what_it_skips(tmp_path, edit, reason):
    """Foreign or corrupt records are listed with a reason in one line; the others are reported
    and nothing crashes or is left half-written (issue 27)."""
    good = {"status": "completed", "model": {"kind": "lipschitz"}, "soundness_violations": 0,
            "metrics": {"epochs": 3}, "config": {"seed": 0},
            "lipschitz": {"nominal": {"encoder_mean": 5.0, "decoder": 5.0}},
            "estimated": {"r": 8.0, "p": 0.5, "num_inputs": 2, "mean": 1.0, "table": "margins.csv"}}
    for name in ("good", "odd"):
        (tmp_path / name).mkdir()
        record = json.loads(json.dumps(good))
        if name == "odd":
            edit(record)
        (tmp_path / name / "results.json").write_text(json.dumps(record, allow_nan=True))
        pd.DataFrame({"index": [0, 1], "estimated": [1.0, 1.0]}).to_csv(tmp_path / name / "margins.csv", index=False)
    assert report_main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    if reason is None:
        assert "skipped" not in md
    else:
        assert f"`odd`: skipped: {reason}" in md
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "report.html").is_file()


def test_report_leaves_out_a_margins_table_without_estimates(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    results = {"status": "completed", "model": {"kind": "standard"}, "metrics": {"epochs": 3},
               "estimated": {"r": 8.0, "p": 0.5, "num_inputs": 2, "mean": 1.0, "table": "margins.csv"}}
    (run / "results.json").write_text(json.dumps(results))
    pd.DataFrame({"index": [0, 1], "other": [1.0, 1.0]}).to_csv(run / "margins.csv", index=False)
    assert report_main([str(tmp_path)]) == 0
    assert not (tmp_path / "estimated_margins.png").exists()  # no numbers to draw


def test_compare_evaluations_pairs_a_run_with_its_re_evaluations(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare", Path(__file__).parents[1] / "sweeps" / "compare_evaluations.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    run = tmp_path / "sweep" / "0_run"
    (run / "evaluations" / "e1").mkdir(parents=True)
    (run / "evaluations" / "e2").mkdir(parents=True)
    pd.DataFrame({"index": [0, 1], "estimated": [2.0, 4.0]}).to_csv(run / "margins.csv", index=False)
    (run / "results.json").write_text(json.dumps({"status": "completed", "model": {"kind": "lipschitz"},
                                                  "config": {"enc_L": 5.0, "seed": 0},
                                                  "estimated": {"table": "margins.csv"}}))
    pd.DataFrame({"index": [0, 1], "estimated": [1.5, 4.5]}).to_csv(run / "evaluations" / "e1" / "margins.csv", index=False)
    (run / "evaluations" / "e1" / "evaluation.json").write_text(json.dumps(
        {"overrides": ["attack.warm_steps=40"], "reused_estimated_margins": False, "estimated": {"table": "margins.csv"}}))
    (run / "evaluations" / "e2" / "evaluation.json").write_text(json.dumps(  # reused: not a new attack
        {"overrides": ["certify.forms=[paper]"], "reused_estimated_margins": True, "estimated": {"table": "margins.csv"}}))
    table = compare.compare(tmp_path / "sweep")
    assert len(table) == 1
    row = table.iloc[0]
    assert row.overrides == "attack.warm_steps=40" and row.run_mean == 3.0 and row.evaluation_mean == 3.0
    assert row.difference == 0.0 and row.smaller_on == 1 and row.inputs == 2


def test_report_names_the_reference_attack_without_steps(tmp_path):
    """An attack=lbfgs run records steps and tol as null (it has neither): the report's attack line
    names the method instead of 'None steps'."""
    estimated = {"r": 8.0, "p": 0.5, "num_inputs": 2, "mean": 1.0, "median": 1.0, "min": 0.5, "max": 1.5,
                 "censored": 0, "method": "lbfgs", "search": "grid", "samples": 40, "starts": 5, "steps": None,
                 "tol": None, "max_radius": 10.0, "pixel_range": True, "table": "margins.csv"}
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "results.json").write_text(json.dumps(
        {"status": "completed", "model": {"kind": "standard"}, "metrics": {"epochs": 1}, "certified": None,
         "estimated": estimated, "soundness_violations": None}))
    assert report_main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "r=8, p=0.5, 2 inputs, 40 samples × 5 starts, lbfgs, grid" in md and "None steps" not in md


def test_runs_are_labelled_by_what_tells_them_apart():
    from lipvae.report import label, tag_rows

    rows = [{"model": "lipschitz", "enc_L": 5.0, "dec_L": 5.0, "arch": "mlp", "layer": "stiefel", "attack": "pgd",
             "std_mode": "learned", "data": "mnist"},
            {"model": "lipschitz", "enc_L": 5.0, "dec_L": 5.0, "arch": "mlp", "layer": "bjorck", "attack": "pgd",
             "std_mode": "learned", "data": "mnist"},
            {"model": "lipschitz", "enc_L": 5.0, "dec_L": 5.0, "arch": "mlp", "layer": "stiefel", "attack": "lbfgs",
             "std_mode": "learned", "data": "mnist"}]
    tag_rows(rows)
    labels = [label(r) for r in rows]
    assert labels == ["L=5 [stiefel pgd]", "L=5 [bjorck pgd]", "L=5 [stiefel lbfgs]"]
    assert len(set(labels)) == 3 and not any("None" in x for x in labels)
    same = [dict(rows[0]), dict(rows[0])]
    tag_rows(same)
    assert [label(r) for r in same] == ["L=5", "L=5"]  # nothing differs: nothing added
    # a standard VAE has no layer: that tells nothing apart, so the Lipschitz runs get no tag
    mixed = [dict(rows[0]), {"model": "standard", "arch": "mlp", "layer": None, "attack": "pgd",
                             "std_mode": "learned", "data": "mnist"}]
    tag_rows(mixed)
    assert [label(r) for r in mixed] == ["L=5", "standard"]
    # the paper's widths beside narrower networks of another layer: both settings are named
    wide = [dict(rows[0], width="512-512"), dict(rows[1], width="256-256"), dict(rows[0], width="512-512", enc_L=10.0, dec_L=10.0)]
    tag_rows(wide)
    assert [label(r) for r in wide] == ["L=5 [512-512 stiefel]", "L=5 [256-256 bjorck]", "L=10 [512-512 stiefel]"]


def test_scatter_labels_each_arm_once_at_its_mean():
    """Seeds of one arm share one label (with their count) at the arm's mean point."""
    import matplotlib.pyplot as plt

    from lipvae.report import _label_points

    rows = [{"model": "lipschitz", "enc_L": 5.0, "seed": s, "x": 1.0 + s, "y": 10.0 * s} for s in range(3)]
    rows.append({"model": "standard", "seed": 0, "x": 0.5, "y": 7.0})
    fig, ax = plt.subplots()
    _label_points(ax, rows, "x", "y", fontsize=7)
    texts = {t.get_text(): t.xy for t in ax.texts}
    plt.close(fig)
    assert texts == {"L=5 (3 seeds)": (2.0, 10.0), "standard": (0.5, 7.0)}


def test_labels_of_nearby_arms_do_not_cover_each_other():
    """Two arms whose points nearly coincide (Figure 4's two L = 5 models on MNIST) get labels
    that do not overlap on the figure; both stay inside the figure."""
    import matplotlib.pyplot as plt

    from lipvae.report import _label_points

    rows = [{"model": "lipschitz", "enc_L": 5.0, "seed": 0, "x": 3.58, "y": 1427.0},
            {"model": "lipschitz", "enc_L": 5.0, "seed": 0, "std_mode": "fixed", "gamma": 0.1,
             "x": 3.53, "y": 1414.0},
            {"model": "lipschitz", "enc_L": 5.0, "seed": 0, "data": "fashion_mnist", "x": 2.40, "y": 838.0}]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter([r["x"] for r in rows], [r["y"] for r in rows])
    _label_points(ax, rows, "x", "y", fontsize=7)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    figure = fig.bbox
    plt.close(fig)
    assert len(boxes) == 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(figure.x0 <= b.x0 and b.x1 <= figure.x1 for b in boxes)


def test_labels_stacked_below_the_lowest_points_stay_inside_the_axes():
    """Three arms at nearly one point at the bottom of the plot (the checks' L = 5 models): their
    labels stack downward, and the y-axis widens so that none falls below the axes."""
    import matplotlib.pyplot as plt

    from lipvae.report import _label_points

    rows = [{"model": "lipschitz", "enc_L": 5.0, "seed": 0, "tag": tag, "x": 3.60 + 0.02 * i, "y": 1423.0 + 2 * i}
            for i, tag in enumerate(["256-256 bjorck", "256-256 stiefel", "512-512 stiefel"])]
    rows += [{"model": "standard", "seed": 0, "x": 1.2, "y": 1720.0}, {"model": "standard", "seed": 0,
                                                                        "tag": "512-512", "x": 1.3, "y": 1729.0}]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter([r["x"] for r in rows], [r["y"] for r in rows])
    _label_points(ax, rows, "x", "y", fontsize=7)
    fig.canvas.draw()
    boxes, frame = [t.get_window_extent() for t in ax.texts], ax.get_window_extent()
    plt.close(fig)
    assert len(boxes) == 5
    assert all(frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes), (frame, [(b.y0, b.y1) for b in boxes])
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_the_html_page_escapes_every_value_a_run_folder_brings():
    """Run names, statuses and W&B links come from run folders: shown as text, never as markup."""
    from lipvae.report import Page, html_page

    hostile = "<script>alert(1)</script>"
    row = {"run": hostile, "model": "standard", "data": hostile, "link": "a'b\"c", "files": [],
           "wandb_url": "x\"><b>bold</b>"}
    page = Page(headline=hostile, context=[("sweep", hostile)], rows=[row], order=[0],
                problems=[{"run": hostile, "status": hostile}], soundness=hostile, figures={})
    out = html_page(page)
    assert "<script>" not in out and out.count("&lt;script&gt;") >= 5
    assert 'href="a&#39;b&#34;c/"' in out and 'href="x&#34;&gt;&lt;b&gt;bold&lt;/b&gt;"' in out
    assert "<b>bold</b>" not in out
    assert "<th>test_<wbr>log_<wbr>likelihood</th>" in out  # a long column name may wrap after "_"
    page.tables = [("paired", "note", pd.DataFrame({hostile + "_x": [1.0]}))]
    assert "<th>&lt;script&gt;alert(1)&lt;/script&gt;_<wbr>x</th>" in html_page(page)


def test_model_rows_give_each_runs_table_row():
    """sweeps/model_rows.py: the numbers of a record in docs/reproduction.md's row order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rows", Path(__file__).parents[1] / "sweeps" / "model_rows.py")
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    record = {"status": "completed", "soundness_violations": 0, "timings": {"total_s": 90.0},
              "config": {"enc_L": 7.0, "seed": 2, "model": {"kind": "lipschitz", "encoder_std": {"mode": "fixed", "gamma": 0.1}}},
              "metrics": {"epochs": 12, "evaluated_epoch": 10, "stop_reason": "patience", "test_log_likelihood": 1470.94,
                          "convergence": {"val_losses": [-1400.0, -1410.0, -1411.0, -1410.5, -1412.25]}},
              "certified": {"mean": 0.6504, "fraction_certified": 0.75}, "estimated": {"mean": 2.0828}}
    assert rows.row(record) == ("| L = 7 | 0.1 | 2 | 12 | 10 | patience | +2.25 | 1470.9 | 0.650 | 75.0% | 2.083 | 0 "
                                "| 1.5 |")
    standard = {**record, "config": {"seed": 3, "model": {"kind": "standard"}}, "certified": None,
                "run": {"resumed_from": {"epoch": 39}}}
    assert rows.row(standard) == ("| standard | – | 3 | 12 | 10 | patience | +2.25 | 1470.9 | – | – | 2.083 | – "
                                  "| resumed (epoch 39); 1.5 after |")
    beta = {**record, "config": {"enc_L": 5.0, "seed": 0, "model": {"kind": "lipschitz", "beta": 5.0}}}
    assert rows.row(beta).startswith("| L = 5, β = 5 | – | 0 |")


def test_paper_time_estimates_a_run_on_idle_cores_from_its_fastest_epochs(tmp_path, capsys):
    """sweeps/paper_time.py: epochs x the fastest tenth of the epoch times + the evaluation's
    seconds; each stage's calls' wall times from the sweep's log."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_time", Path(__file__).parents[1] / "sweeps" / "paper_time.py")
    paper_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_time)
    run = tmp_path / "fig9" / "0_lipschitz_encL5.0_decL5.0_seed0"
    run.mkdir(parents=True)
    seconds = [30, 21, 22, 45, 23, 22, 40, 22, 25, 24, 22, 60]  # 12 epochs; sorted, the fastest tenth's (index 12 // 10) is 22
    (run / "train.log").write_text("".join(
        f"[2026-12-07 10:00:00,000][lipvae][INFO] - epoch {i + 1}/400: train loss -1.00, val loss -2.00 "
        f"(best -2.00 at epoch {i + 1}), {422 * (i + 1)} steps, {s} s\n" for i, s in enumerate(seconds)))
    (run / "results.json").write_text(json.dumps({
        "status": "completed", "metrics": {"epochs": 12},
        "timings": {"test_s": 60.0, "certify_s": 6.0, "attack_s": 30.0, "total_s": 999.0}}))
    assert paper_time.idle_seconds(run) == pytest.approx(12 * 22 + 96.0)
    (tmp_path / "paper.log").write_text("== fig9: training, x\n== fig9: 100 s wall\n== fig9: training, y\n"
                                        "== fig9: 250 s wall\n")
    assert paper_time.main([str(tmp_path), "--log", str(tmp_path / "paper.log")]) == 0
    out = capsys.readouterr().out
    assert "| fig9 | 1 | 100 + 250 | 0.10 |" in out and "0.05 h on 2 cores" in out


def test_the_report_compares_each_lipschitz_run_with_its_seeds_standard_vae(tmp_path):
    """report.md's paired section: lipvae.paired's numbers per run and, with several seeds, per L;
    none where a seed has no single standard VAE to pair with."""
    from lipvae.report import PAIRED, Page, markdown, paired_tables

    def table(values):
        return pd.DataFrame({"index": range(4), "estimated": values})

    margins = {"std0": [1.0, 2.0, 3.0, 4.0], "std1": [3.0, 3.0, 3.0, 3.0],
               "L5s0": [2.0, 2.5, 2.0, 5.0], "L5s1": [2.0, 2.0, 2.0, 2.0]}  # +0.375 and -1 against their seeds
    rows = [{"model": "standard", "seed": 0}, {"model": "standard", "seed": 1},
            {"model": "lipschitz", "enc_L": 5.0, "seed": 0}, {"model": "lipschitz", "enc_L": 5.0, "seed": 1}]
    frames = [table(values) for values in margins.values()]
    tables = paired_tables(rows, frames)
    (title, _, per_run), (_, _, per_l) = tables
    assert title == PAIRED and list(per_run.mean_difference) == pytest.approx([0.375, -1.0])
    assert list(per_run.larger_on) == [3, 0] and per_run.loc[1, "ci_low"] == per_run.loc[1, "ci_high"] == -1.0
    assert per_l.loc[0, "verdict"] == "undecided" and per_l.loc[0, "mean_difference"] == pytest.approx(-0.3125)
    page = Page(headline="", context=[], rows=rows, order=[0, 1, 2, 3], problems=[], soundness="", figures={},
                tables=tables)
    md = markdown(page, tmp_path)
    assert f"## {PAIRED}" in md and "| L=5 s1 | 5 | 1 | 4 | 2.000 | 3.000 | -1.000 | -1.000 | -1.000 | 0 |" in md
    twice = [*rows[:2], {"model": "standard", "seed": 1}, rows[3]]  # seed 1 has two standard VAEs
    (title, note, empty), = paired_tables(twice, [frames[0], frames[1], table(margins["std1"]), frames[3]])
    assert title == PAIRED and note.startswith("Not made: the Lipschitz runs of seed 1 need exactly one") and empty.empty
    md = markdown(Page(headline="", context=[], rows=twice, order=[0, 1, 2, 3], problems=[], soundness="", figures={},
                       tables=[(title, note, empty)]), tmp_path)
    assert f"## {PAIRED}\n\nNot made: " in md and "mean_difference" not in md
    assert paired_tables(rows[:2], frames[:2]) == []  # no Lipschitz run: nothing to say


def test_a_report_over_two_data_sets_compares_within_each(tmp_path):
    """A sweep over data sets (data=mnist,fashion_mnist model=lipschitz,standard seed=0,1): one
    paired comparison and one verdict per data set, never a verdict over both."""
    from lipvae.paired import measured_on
    from lipvae.report import PAIRED, paired_tables

    rows, frames = [], []
    for data, lip in (("mnist", 3.0), ("fashion_mnist", 0.0)):  # Lipschitz ahead on MNIST, behind on Fashion
        inputs = measured_on({"name": data, "sources": {data: "d"}}, {"r": 8.0, "p": 0.5})
        for seed in (0, 1):
            rows += [{"model": "standard", "seed": seed, "data": data, "inputs": inputs},
                     {"model": "lipschitz", "enc_L": 5.0, "seed": seed, "data": data, "inputs": inputs}]
            frames += [pd.DataFrame({"index": range(3), "estimated": [1.0 + seed] * 3}),
                       pd.DataFrame({"index": range(3), "estimated": [lip + seed] * 3})]
    tables = paired_tables(rows, frames)
    assert [t[0] for t in tables] == [f"{PAIRED}: mnist, r=8, p=0.5", "Per L, over seeds: mnist, r=8, p=0.5",
                                      f"{PAIRED}: fashion_mnist, r=8, p=0.5", "Per L, over seeds: fashion_mnist, r=8, p=0.5"]
    assert tables[1][2].verdict.tolist() == ["more robust"] and tables[3][2].verdict.tolist() == ["less robust"]
    assert tables[0][2].mean_difference.tolist() == [2.0, 2.0] and tables[2][2].mean_difference.tolist() == [-1.0, -1.0]


def test_runs_measured_on_other_inputs_are_never_paired(tmp_path, monkeypatch):
    """A Lipschitz run and a standard VAE of the same seed pair only when their margins were
    measured on the same inputs: the same data read identically and the same attack r and p."""
    import numpy as np

    from lipvae.paired import measured_on
    from lipvae.plots import plt
    from lipvae.report import fig_latent_attack_pair, paired_tables

    mnist = {"name": "mnist", "sources": {"mnist/train": "aa", "mnist/test": "bb"}}
    estimated = {"r": 8.0, "p": 0.5, "mean": 3.0}
    same = measured_on(mnist, estimated)
    assert same == measured_on(dict(mnist), {**estimated, "mean": 1.0})  # results differ, inputs do not
    others = [measured_on({**mnist, "name": "image_folder"}, estimated),
              measured_on({**mnist, "sources": {"mnist/train": "aa", "mnist/test": "cc"}}, estimated),  # limit, files
              measured_on(mnist, {**estimated, "r": 4.0}), measured_on(mnist, {**estimated, "p": 0.9})]
    assert len({same, *others}) == 5
    frames = [pd.DataFrame({"index": range(3), "estimated": v}) for v in ([1.0] * 3, [2.0] * 3)]
    for inputs in others:
        rows = [{"model": "standard", "seed": 0, "inputs": inputs}, {"model": "lipschitz", "enc_L": 5.0, "seed": 0,
                                                                     "inputs": same}]
        (_, note, table), = paired_tables(rows, frames)
        assert note.startswith("Not made") and table.empty
    rows[0]["inputs"] = same
    (_, _, table), = paired_tables(rows, frames)
    assert table.mean_difference.tolist() == [1.0]
    # the Fig. 1 pair: the standard VAE of the Lipschitz run's data, none of another
    runs = []
    for name in ("std_fashion", "lip_mnist", "std_mnist"):
        (tmp_path / name).mkdir()
        plt.imsave(tmp_path / name / "latent_attack.png", np.zeros((4, 4)))
        runs.append(tmp_path / name)
    rows = [{"model": "standard", "enc_L": None, "data": "fashion_mnist"},
            {"model": "lipschitz", "enc_L": 5.0, "data": "mnist"}, {"model": "standard", "enc_L": None, "data": "mnist"}]
    assert fig_latent_attack_pair(rows[:2], runs[:2], tmp_path / "pair.png") is None
    read, imread = [], plt.imread
    monkeypatch.setattr(plt, "imread", lambda path: read.append(Path(path).parent.name) or imread(path))
    assert fig_latent_attack_pair(rows, runs, tmp_path / "pair.png") == tmp_path / "pair.png"
    assert read == ["std_mnist", "lip_mnist"]


def test_censored_margins_block_only_the_verdict_they_could_overturn():
    """A censored margin is a lower bound: censored standard-VAE margins can only make the true
    difference smaller, so they leave "more robust" unproven but not "less robust"; censored
    Lipschitz margins the other way round. The table counts them on each side."""
    from lipvae.paired import Arm, differences, summarise

    idx = pd.Index(range(4))

    def arm(kind, seed, value, censored=()):
        flags = pd.Series([i in censored for i in idx], index=idx)
        return Arm(kind, kind, 5.0 if kind == "lipschitz" else None, seed, pd.Series([value] * 4, index=idx),
                   "same", flags)

    def verdict(lip, std):
        table = differences([*lip, *std], resamples=200)
        return table, summarise(table).verdict.tolist()[0]

    above = [arm("lipschitz", s, 3.0) for s in (0, 1)]
    below = [arm("lipschitz", s, 0.5) for s in (0, 1)]
    plain = [arm("standard", s, 1.0) for s in (0, 1)]
    capped = [arm("standard", s, 1.0, censored=(0, 2)) for s in (0, 1)]
    assert verdict(above, plain)[1] == "more robust" and verdict(below, plain)[1] == "less robust"
    table, said = verdict(above, capped)
    assert said == "undecided (standard VAE margins censored)" and table.standard_censored.tolist() == [2, 2]
    assert verdict(below, capped)[1] == "less robust"  # the true difference is even lower
    lip_capped = [arm("lipschitz", s, 0.5, censored=(1,)) for s in (0, 1)]
    table, said = verdict(lip_capped, plain)
    assert said == "undecided (Lipschitz margins censored)" and table.lipschitz_censored.tolist() == [1, 1]
    assert verdict([arm("lipschitz", s, 3.0, censored=(1,)) for s in (0, 1)], plain)[1] == "more robust"
