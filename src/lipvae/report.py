"""``python -m lipvae.report <run or sweep dir> [more dirs...] [--out DIR]``: a sweep's report.

Reads only the runs' files (``results.json``, ``margins.csv``, the PNGs beside them). Runs
that failed, are missing ``results.json`` or hold a half-written or unreadable one are
listed, never fatal. Writes ``report.md``, a self-contained ``report.html`` (images
embedded), ``results.csv`` and the figures as PNG into ``--out`` (default: the first dir).
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lipvae.errors import UserError, command
from lipvae.paired import measured_on
from lipvae.plots import plt, save_figure
from lipvae.safety import REPORT_ENTRIES, check_entries
from lipvae.results import RESULTS_FILE, Results, ResultsError, RunFolder, atomic_write_text, write_table

log = logging.getLogger("lipvae")

COLUMNS = [
    "run", "status", "data", "split", "model", "arch", "width", "layer", "attack", "enc_L", "dec_L", "std_mode", "gamma", "beta",
    "latent_dim",
    "lr", "epochs", "stopped_by", "test_log_likelihood", "test_elbo", "certified_mean", "certified_median", "certified_min",
    "fraction_certified", "global_margin", "estimated_mean", "estimated_median", "estimated_min",
    "estimated_censored", "soundness_violations", "certified_holds_with_probability", "coupled_exceedances",
    "coupled_expected", "total_s", "code", "wandb_run_id",
]
#: The columns of the compact table (the full one is behind a toggle and in results.csv).
KEY_COLUMNS = [
    "epochs", "stopped_by", "test_log_likelihood", "certified_mean", "fraction_certified", "estimated_mean",
    "estimated_median", "estimated_censored", "soundness_violations",
]


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run folders below ``dirs``: those Hydra made (``.hydra/``) or holding a results file."""
    runs = set()
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"report: {d} is not a folder")
        for marker in [*d.rglob(".hydra"), *d.rglob(RESULTS_FILE)]:
            runs.add(marker.parent)
    return sorted(runs)


def load_row(run: Path, root: Path) -> tuple[dict, Results | None]:
    """One table row for a run and its record (None when unusable)."""
    name = str(run.relative_to(root)) if run != root and root in run.parents else run.name
    try:
        r = RunFolder(run).results()
    except ResultsError as e:
        why = f"{e} (killed or still running?)" if str(e).startswith("missing") else str(e)
        return {"run": name, "status": why}, None
    if r.status != "completed":
        return {"run": name, "status": f"failed: {r.error or 'unknown error'}"}, None
    why = invalid(r)
    if why is not None:
        return {"run": name, "status": f"skipped: {why}"}, None
    row = {
        "run": name,
        "status": "completed",
        "data": r.get("data", "name"),
        "split": r.get("data", "split"),
        "model": r.get("model", "kind"),
        "arch": r.get("model", "arch") or "mlp",
        "width": _width(r),
        "layer": _short(r.get("config", "model", "layer", "_target_")) if r.get("model", "kind") == "lipschitz" else None,
        "attack": r.get("estimated", "method"),
        "enc_L": r.get("lipschitz", "nominal", "encoder_mean"),
        "dec_L": r.get("lipschitz", "nominal", "decoder"),
        "std_mode": r.get("model", "encoder_std", "mode"),
        "gamma": r.get("model", "encoder_std", "gamma"),
        "beta": r.get("model", "beta"),
        "latent_dim": r.get("model", "latent_dim"),
        "lr": r.get("config", "module", "lr"),
        "epochs": r.get("metrics", "epochs"),
        "stopped_by": r.get("metrics", "stop_reason"),
        "test_log_likelihood": r.get("metrics", "test_log_likelihood"),
        "test_elbo": r.get("metrics", "test_elbo"),
        "certified_mean": r.get("certified", "mean"),
        "certified_median": r.get("certified", "median"),
        "certified_min": r.get("certified", "min"),
        "fraction_certified": r.get("certified", "fraction_certified"),
        "global_margin": r.get("certified", "global_margin"),
        "estimated_mean": r.get("estimated", "mean"),
        "estimated_median": r.get("estimated", "median"),
        "estimated_min": r.get("estimated", "min"),
        "estimated_censored": r.get("estimated", "censored"),
        "soundness_violations": r.get("soundness_violations"),
        # the primary certificate's guarantee: 1 for a proof, 1 - alpha for the coupled form
        "certified_holds_with_probability": _holds(r),
        "coupled_exceedances": r.get("coupled_exceedances", "observed"),
        "coupled_expected": r.get("coupled_exceedances", "expected"),
        "total_s": r.get("timings", "total_s"),
        "code": r.get("run", "code"),
        "wandb_run_id": r.get("run", "wandb_run_id"),
    }
    row["seed"] = r.get("config", "seed")
    row["inputs"] = measured_on(r.get("data"), r.get("estimated"))  # which runs' margins pair (not a column)
    return row, r


def _number(v, finite: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return ok and (not finite or bool(np.isfinite(v)))


#: Fields the report reads as numbers: (path, may be null, must be finite).
_NUMBERS = [
    (("metrics", "epochs"), True, False), (("metrics", "test_log_likelihood"), True, False),
    (("metrics", "test_elbo"), True, False), (("model", "beta"), True, False), (("model", "latent_dim"), True, False),
    (("model", "encoder_std", "gamma"), True, False),
    (("lipschitz", "nominal", "encoder_mean"), True, False), (("lipschitz", "nominal", "decoder"), True, False),
    (("soundness_violations",), True, True),
    *[(("certified", key), True, False) for key in ("mean", "median", "min", "fraction_certified", "global_margin",
                                                    "num_inputs")],
    *[(("estimated", key), True, False) for key in ("mean", "median", "min", "censored", "num_inputs")],
]


def invalid(r: Results) -> str | None:
    """Why a completed record cannot be reported (a foreign schema version, a hand-edited or
    corrupt file), in a few words; None when every field the report reads has its type."""
    for part in ("config", "model", "metrics", "lipschitz", "certified", "estimated", "data", "run", "timings"):
        if r.get(part) is not None and not isinstance(r.get(part), dict):
            return f"{part} is a {type(r.get(part)).__name__}, not an object"
    for part in ("certified", "estimated"):
        if isinstance(r.get(part), dict) and not all(_number(r.get(part, k)) for k in ("r", "p")):
            return f"{part}.r or {part}.p is missing or not a number (results.json of another schema version?)"
    for path, nullable, finite in _NUMBERS:
        value = r.get(*path)
        if value is None and nullable:
            continue
        if not _number(value, finite):
            return f"{'.'.join(path)} is {value!r}, not a{' finite' if finite else ''} number"
    return None


def _holds(r: Results) -> float | None:
    """With what probability the run's primary certificates hold (None: no certificates)."""
    if not isinstance(r.get("certified"), dict):
        return None
    held = r.get("certified", "holds_with_probability")
    return None if held is None else float(held)


def _short(target) -> str | None:
    """A layer's class name as the model/layer option names it (``lipvae.networks.StiefelLinear`` → stiefel)."""
    if not isinstance(target, str):
        return None
    name = target.rsplit(".", 1)[-1]
    return name.removesuffix("Linear").lower() or name


def _width(r: Results) -> str | None:
    """The network's widths as ``512-512`` (an MLP's hidden layers; a conv net's channels)."""
    arch = r.get("config", "model", "arch") or {}
    widths = arch.get("channels") if isinstance(arch, dict) and arch.get("kind") == "conv" else \
        r.get("config", "model", "hidden")
    return "-".join(str(w) for w in widths) if isinstance(widths, list) and widths else None


#: what may tell runs of one report apart beside the constants, γ, β and the seed (label's ``tag``)
DISTINGUISHING = ("arch", "width", "layer", "attack", "std_mode", "data")


def tag_rows(rows: list[dict]) -> None:
    """Give each row the settings that differ between the report's runs (``tag``), so that two
    runs of the same L with another layer or attack are told apart in every table and figure."""
    # a setting a run does not have (a standard VAE's layer) tells nothing apart
    varying = [f for f in DISTINGUISHING if len({str(r.get(f)) for r in rows if r.get(f) is not None}) > 1]
    for r in rows:
        r["tag"] = " ".join(f"{r.get(f)}" for f in varying if r.get(f) is not None and f != "data")


#: a run's own figures, linked from the report's table
RUN_FIGURES = {"reconstructions.png": "recon.", "latent_attack.png": "latent attack",
               "certified_margins.png": "certified", "certified_vs_estimated.png": "cert. vs est.",
               "prior_samples.png": "samples", "results.json": "json"}


def _wandb_url(r: Results) -> str | None:
    """The W&B run's page, for a run logged online to a known entity and project."""
    run_id, wandb = r.get("run", "wandb_run_id"), r.get("config", "logger", "wandb") or {}
    if not run_id or not isinstance(wandb, dict) or wandb.get("mode") != "online":
        return None
    entity, project = wandb.get("entity"), wandb.get("project")
    return f"https://wandb.ai/{entity}/{project}/runs/{run_id}" if entity and project else None


def label(row: dict) -> str:
    if row["model"] != "lipschitz":
        text = "standard"
    elif row.get("enc_L") is None:
        text = "lipschitz"
    else:
        same = row.get("dec_L") in (None, row["enc_L"])
        text = f"L={row['enc_L']:g}" + ("" if same else f"/{row['dec_L']:g}")
    if row.get("std_mode") == "fixed" and row.get("gamma") is not None:
        text += f" γ={row['gamma']:g}"
    if row.get("beta") not in (None, 1.0):
        text += f" β={row['beta']:g}"
    if row.get("data") not in (None, "mnist"):
        text += f" ({row['data']})"
    if row.get("seed") not in (None, 0):  # a grid over seeds: tell the arms' runs apart
        text += f" s{row['seed']}"
    if row.get("tag"):
        text += f" [{row['tag']}]"
    return text


def _margins(run: Path, r: Results) -> pd.DataFrame | None:
    table = r.get("estimated", "table")
    if not table or not (run / table).is_file():
        return None
    try:
        frame = pd.read_csv(run / table)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if "estimated" not in frame or not pd.api.types.is_numeric_dtype(frame["estimated"]):
        log.warning("%s: %s has no numeric 'estimated' column; its margins are left out of the figures", run, table)
        return None
    return frame


def _order(rows: list[dict]) -> list[int]:
    """Lipschitz runs by L, then standard ones: the paper's left-to-right order."""
    return sorted(range(len(rows)), key=lambda i: (rows[i]["model"] != "lipschitz", rows[i]["enc_L"] or 0, label(rows[i])))


def _attack_setting(results: list[Results]) -> str:
    """``r=8, p=0.5, 25 inputs`` when every run shares it, else a note that they differ."""
    settings = {
        (r.get("estimated", "r"), r.get("estimated", "p"), r.get("estimated", "num_inputs"))
        for r in results
        if r.get("estimated")
    }
    if len(settings) == 1:
        r_, p_, n = settings.pop()
        return f"r={r_:g}, p={p_:g}, {n} test inputs per model"
    return "attack settings differ between runs"


def fig_estimated_distributions(rows, margins, results, path: Path) -> Path | None:
    """Paper Fig. 5 (left): estimated-margin distributions, one box per model, the standard
    VAE(s) in red at the right."""
    idx = [i for i in _order(rows) if margins[i] is not None]
    if not idx:
        return None
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(idx) + 2), 3.6))
    box = ax.boxplot([margins[i]["estimated"].to_numpy() for i in idx], showmeans=True, patch_artist=True)
    for patch, i in zip(box["boxes"], idx):
        patch.set_facecolor("#f4b6b6" if rows[i]["model"] != "lipschitz" else "#b6cdf4")
    ax.set_xticks(range(1, len(idx) + 1), [label(rows[i]) for i in idx], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("model (blue: Lipschitz VAE, red: standard VAE; triangle: mean)", fontsize=8)
    ax.set_ylabel("estimated margin ‖δ‖₂")
    ax.set_title(f"estimated robustness margins\n{_attack_setting([results[i] for i in idx])}", fontsize=9)
    return save_figure(fig, path)


def fig_likelihood_vs_robustness(rows, path: Path) -> Path | None:
    """Paper Fig. 5 (right): mean test log-likelihood against mean estimated margin."""
    pts = [r for r in rows if r.get("test_log_likelihood") is not None and r.get("estimated_mean") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, colour, marker in (("lipschitz", "tab:blue", "o"), ("standard", "tab:red", "s")):
        group = [r for r in pts if (r["model"] == "lipschitz") == (kind == "lipschitz")]
        if not group:
            continue
        ax.scatter([r["estimated_mean"] for r in group], [r["test_log_likelihood"] for r in group], c=colour,
                   marker=marker, label=f"{kind} VAE")
    _label_points(ax, pts, "estimated_mean", "test_log_likelihood", fontsize=7)
    ax.set_xlabel("mean estimated margin")
    ax.set_ylabel("mean test log-likelihood (nats)")
    ax.set_title("likelihood vs robustness", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _label_points(ax, rows: list[dict], x: str, y: str, fontsize: int) -> None:
    """One label per arm (the runs that differ only in their seed), beside the arm's mean point
    (``x``, ``y``: the rows' columns), with how many seeds it has: seeds' labels would pile up."""
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(label({**r, "seed": None}), []).append(r)
    ax.autoscale_view()  # the final limits, to place the labels against each other
    to_points = ax.transData + ax.figure.dpi_scale_trans.inverted()  # data -> inches (x 72: points)
    frame = ax.transAxes + ax.figure.dpi_scale_trans.inverted()  # axes fraction -> inches
    right = frame.transform((0.6, 0))[0] * 72
    points = [(name + (f" ({len(group)} seeds)" if len(group) > 1 else ""),
               (sum(r[x] for r in group) / len(group), sum(r[y] for r in group) / len(group)))
              for name, group in arms.items()]
    placed: list[tuple[float, float, float, float]] = []
    for text, at in sorted(points, key=lambda point: -point[1][1]):  # the highest first
        px, py = to_points.transform(at) * 72
        width, height = 0.55 * fontsize * len(text), fontsize + 1
        left = px > right  # a point in the right part of the plot gets its label on its left
        x0 = px - 4 - width if left else px + 4
        dy = 4.0
        while any(x0 < b[2] and b[0] < x0 + width and py + dy < b[3] and b[1] < py + dy + height for b in placed):
            dy -= height  # below the labels already placed that it would cover
        placed.append((x0, py + dy, x0 + width, py + dy + height))
        ax.annotate(text, at, fontsize=fontsize, xytext=(-4 if left else 4, dy), textcoords="offset points",
                    ha="right" if left else "left")
    _fit_labels(ax, frame, placed)


def _fit_labels(ax, frame, placed: list[tuple[float, float, float, float]]) -> None:
    """Widen the y-axis so that labels stacked below the lowest points (or above the highest)
    stay inside the axes (``frame``: axes fraction to inches; ``placed``: the labels' boxes in
    points, as ``_label_points`` placed them)."""
    if not placed:
        return
    bottom, top = (frame.transform(corner)[1] * 72 for corner in ((0, 0), (0, 1)))
    below = max(0.0, bottom - min(b[1] for b in placed) + 4)  # 4: a text's descent below its box
    above = max(0.0, max(b[3] for b in placed) - top + 4)
    room = top - bottom - below - above
    if (below or above) and room > (top - bottom) / 3:
        y0, y1 = ax.get_ylim()
        per_point = (y1 - y0) / room
        ax.set_ylim(y0 - below * per_point, y1 + above * per_point)


def optuna_front(dirs: list[Path]) -> list[dict]:
    """The Pareto solutions an Optuna multi-objective sweep wrote (``optimization_results.yaml``
    with ``solutions``, read as data) in any of ``dirs``; [] where there are none."""
    import yaml

    from lipvae.safety import UnsafeFile, read_regular

    found = []
    for folder in dirs:
        try:
            record = yaml.safe_load(read_regular(Path(folder) / "optimization_results.yaml"))
        except (OSError, UnsafeFile, yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("solutions"), list):
            found += [s for s in record["solutions"] if isinstance(s, dict) and isinstance(s.get("values"), list)]
    return found


def fig_front(rows, dirs: list[Path], path: Path) -> Path | None:
    """An Optuna front (``hydra/sweeper=front``): every run's test log-likelihood against its
    certified mean margin, the Pareto solutions Optuna reported circled."""
    front = optuna_front(dirs)
    pts = [r for r in rows if r.get("test_log_likelihood") is not None and r.get("certified_mean") is not None]
    if not front or not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter([r["certified_mean"] for r in pts], [r["test_log_likelihood"] for r in pts], c="tab:blue", s=18,
               label="trials")
    values = [s["values"] for s in front if len(s["values"]) == 2]
    if values:
        ax.scatter([v[1] for v in values], [v[0] for v in values], s=90, facecolors="none", edgecolors="tab:red",
                   label="Pareto front (Optuna)")
    _label_points(ax, pts, "certified_mean", "test_log_likelihood", fontsize=6)
    ax.set_xlabel("certified mean margin")
    ax.set_ylabel("test log-likelihood (nats)")
    ax.set_title("likelihood vs certified robustness: the searched front", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def fig_latent_attack_pair(rows, runs, path: Path) -> Path | None:
    """Paper Fig. 1: the latent-space attack on a standard VAE and on a Lipschitz VAE (the
    smallest L) of the same data, side by side, from the runs' own ``latent_attack.png``."""
    def first(lipschitz: bool, data=None):
        return next((i for i in _order(rows) if (rows[i]["model"] == "lipschitz") == lipschitz
                     and data in (None, rows[i].get("data")) and (runs[i] / "latent_attack.png").is_file()), None)

    lip = first(True)
    std = None if lip is None else first(False, rows[lip].get("data"))
    if std is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 5.5))
    for ax, i, title in zip(axes, (std, lip), ("standard VAE" + label(rows[std])[len("standard"):],
                                                "Lipschitz VAE, " + label(rows[lip]))):
        ax.imshow(plt.imread(runs[i] / "latent_attack.png"))
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def fig_certified_vs_estimated(rows, margins, path: Path) -> Path | None:
    """Paper Fig. 4: certified vs estimated per input, all Lipschitz runs, with the diagonal."""
    idx = [i for i in _order(rows) if margins[i] is not None and "certified_tight" in margins[i]]
    if not idx:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    top = 1e-3
    for i in idx:
        m = margins[i]
        ax.scatter(m["estimated"], m["certified_tight"], s=12, alpha=0.7, label=label(rows[i]))
        top = max(top, float(m["estimated"].max()), float(m["certified_tight"].max()))
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", lw=1)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("estimated margin")
    ax.set_ylabel("certified margin (tight)")
    ax.legend(fontsize=7)
    ax.set_title("every point must lie on or below the diagonal", fontsize=9)
    return save_figure(fig, path)


def fig_fixed_sigma_grid(rows, path: Path) -> Path | None:
    """Paper Fig. 3: with σ fixed to γ, the mean estimated margin over the grid of γ and L,
    as lines over L (one per γ) and over γ (one per L)."""
    pts = [r for r in rows if r.get("std_mode") == "fixed" and r.get("gamma") is not None
           and r.get("enc_L") is not None and r.get("estimated_mean") is not None]
    gammas = sorted({r["gamma"] for r in pts})
    ls = sorted({r["enc_L"] for r in pts})
    if len(gammas) < 2 and len(ls) < 2:
        return None
    frame = pd.DataFrame(pts).groupby(["gamma", "enc_L"])["estimated_mean"].mean()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (across, lines, name, other) in zip(axes, ((ls, gammas, "L", "γ"), (gammas, ls, "γ", "L"))):
        for v in lines:
            keys = [(v, x) if name == "L" else (x, v) for x in across]
            got = [(x, frame[k]) for x, k in zip(across, keys) if k in frame.index]
            if got:
                ax.plot(*zip(*got), marker="o", label=f"{other}={v:g}")
        ax.set_xlabel("Lipschitz constant L" if name == "L" else "fixed encoder std γ")
        ax.set_ylabel("mean estimated margin")
        ax.legend(fontsize=7)
    fig.suptitle("fixed σ ≡ γ: which matters more, L or γ?", fontsize=9)
    return save_figure(fig, path)


def fig_latent_2d(rows, runs, path: Path) -> Path | None:
    """Paper Figs. 6 and 7 in one picture: for every run with a 2-D latent space, its aggregate
    posterior (top) and its prior samples (bottom), from the runs' own images."""
    idx = [i for i in _order(rows) if rows[i].get("latent_dim") == 2
           and (runs[i] / "aggregate_posterior.png").is_file() and (runs[i] / "prior_samples.png").is_file()]
    if not idx:
        return None
    fig, axes = plt.subplots(2, len(idx), figsize=(3.6 * len(idx), 7.2), squeeze=False)
    for col, i in enumerate(idx):
        for row, name in enumerate(("aggregate_posterior.png", "prior_samples.png")):
            ax = axes[row][col]
            ax.imshow(plt.imread(runs[i] / name))
            ax.set_axis_off()
        title = "standard VAE" if rows[i]["model"] != "lipschitz" else f"Lipschitz VAE, {label(rows[i])}"
        axes[0][col].set_title(title, fontsize=10)
    return save_figure(fig, path)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class NothingCompleted(UserError):
    """The folders hold runs, but none of them completed (the report is still written)."""


def _context(results: list[dict], rows: list[dict], dirs: list[Path]) -> list[tuple[str, str]]:
    """Header lines: how the runs were made and what their numbers mean."""
    def distinct(values):
        return ", ".join(dict.fromkeys(str(v) for v in values if v not in (None, ""))) or "–"

    splits = distinct(
        f"{r.get('data', 'name')} {r.get('data', 'split')} "
        f"({r.get('data', 'num_train')}/{r.get('data', 'num_val')}/{r.get('data', 'num_test')} train/val/test)"
        for r in results
    )
    epochs = [row["epochs"] for row in rows if row.get("epochs") is not None]
    certified = distinct(
        f"r={r.get('certified', 'r'):g}, p={r.get('certified', 'p'):g}, {r.get('certified', 'form')} form, "
        f"{r.get('certified', 'num_inputs')} inputs"
        + ("" if _holds(r) in (1.0, None) else f", each holding with probability >= {_holds(r):g} over the certifier's samples"
           " (not a proof)")
        for r in results
        if r.get("certified")
    )
    attack = distinct(
        ", ".join(str(x) for x in (
            f"r={e['r']:g}", f"p={e['p']:g}", f"{e['num_inputs']} inputs",
            f"{e.get('samples')} samples × {e.get('starts')} starts" if e.get("samples") and e.get("starts") else None,
            f"{e.get('steps')} steps" if e.get("steps") is not None else e.get("method"),  # lbfgs: no steps
            e.get("search")) if x is not None)
        for e in (r.get("estimated") for r in results)
        if e
    )
    return [
        ("folders", ", ".join(map(str, dirs))),
        ("preset", distinct(r.get("run", "experiment") for r in results)),
        ("tier", distinct(r.get("run", "tier") for r in results)),
        ("commands", distinct(r.get("run", "command") for r in results)),
        ("data", splits),
        ("epochs trained", "–" if not epochs else str(epochs[0]) if min(epochs) == max(epochs) else
         f"{min(epochs)}–{max(epochs)} (per run in the table)"),
        ("certified margins", certified),
        ("estimated margins", attack),
        ("code", distinct(r.get("run", "code") for r in results)),
        ("W&B runs", distinct(r.get("run", "wandb_run_id") for r in results)),
    ]


def _soundness_line(rows: list[dict]) -> str:
    checked = [r for r in rows if r.get("soundness_violations") is not None]
    total = sum(int(r["soundness_violations"]) for r in checked)
    line = (
        f"Soundness violations (certified > estimated): {total} in {len(checked)} checked run(s)"
        f" of {len(rows)} completed (standard VAEs have no certificate to check)."
    )
    coupled = [r for r in rows if r.get("coupled_exceedances") is not None]
    if coupled:  # allowed with probability alpha per input, so counted apart from the proofs' violations
        seen = sum(int(r["coupled_exceedances"]) for r in coupled)
        expected = sum(float(r.get("coupled_expected") or 0.0) for r in coupled)
        line += (f" Coupled certificates (probabilistic) above the estimated margin: {seen}, against about"
                 f" {expected:.3g} expected from their failure probability α, in {len(coupled)} run(s).")
    return line


@dataclass
class Page:
    """What report.md and report.html both show."""

    headline: str
    context: list
    rows: list[dict]
    order: list[int]
    problems: list[dict]
    soundness: str
    figures: dict
    tables: list = ()  # (title, note, DataFrame): the paired comparison


def build_report(dirs: list[Path], out: Path | None = None, tightness: bool = False) -> Path:
    """Write report.md, report.html, results.csv and the figures; raises ``NothingCompleted``
    (after writing) when no run completed."""
    dirs = [Path(d) for d in dirs]
    runs = find_runs(dirs)
    if not runs:
        raise UserError(f"report: no runs (folders with .hydra/ or {RESULTS_FILE}) below {', '.join(map(str, dirs))}")
    out = Path(out or dirs[0])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: got {str(out)!r}, which is a file; accepted: a folder (made if missing)")
    out.mkdir(parents=True, exist_ok=True)
    check_entries(out, REPORT_ENTRIES, subfolders=())  # a planted symlink is refused, its target untouched
    root = dirs[0] if len(dirs) == 1 else Path("/")
    loaded = [load_row(run, root) for run in runs]
    good = [(row, r, run) for (row, r), run in zip(loaded, runs) if r is not None]
    problems = [row for row, r in loaded if r is None]
    rows, results, run_dirs = [row for row, _, _ in good], [r for _, r, _ in good], [run for _, _, run in good]
    tag_rows(rows)
    for row, r, run in zip(rows, results, run_dirs):  # where the report links each run
        row["link"] = os.path.relpath(run, out)
        row["files"] = [f for f in RUN_FIGURES if (run / f).is_file() and not (run / f).is_symlink()]
        row["wandb_url"] = _wandb_url(r)
    write_table(out / "results.csv", pd.DataFrame([*rows, *problems], columns=COLUMNS + ["seed"]))
    margins = [_margins(run, r) for r, run in zip(results, run_dirs)]  # each run's table, read once
    page = Page(
        headline=f"{len(rows)} completed run(s), {len(problems)} not usable.", context=_context(results, rows, dirs),
        rows=rows, order=_order(rows), problems=problems, soundness=_soundness_line(rows),
        figures=report_figures(rows, results, run_dirs, margins, out, dirs, tightness),
        tables=paired_tables(rows, margins),
    )
    atomic_write_text(out / "report.md", markdown(page, out))
    atomic_write_text(out / "report.html", html_page(page))
    if not rows:
        raise NothingCompleted(
            f"report: none of the {len(problems)} run(s) below {', '.join(map(str, dirs))} completed"
            f" (listed in {out / 'report.md'})"
        )
    return out / "report.md"


def report_figures(rows: list[dict], results: list[dict], run_dirs: list[Path], margins: list, out: Path,
                   dirs: list[Path] = (), tightness: bool = False) -> dict:
    """The paper's figures that these runs can draw, by title (PNG files in ``out``); ``margins``:
    each run's estimated-margins table (or None); ``dirs``: the folders reported on (an Optuna
    sweep's front is read there)."""
    figures = {
        "Likelihood against certified margin: the front an Optuna sweep searched": fig_front(
            rows, list(dirs), out / "optuna_front.png"
        ),
        "Latent-space attack, standard vs Lipschitz VAE (paper Fig. 1)": fig_latent_attack_pair(
            rows, run_dirs, out / "latent_attack_pair.png"
        ),
        "Estimated margins per model (paper Fig. 5, left)": fig_estimated_distributions(
            rows, margins, results, out / "estimated_margins.png"
        ),
        "Log-likelihood vs robustness (paper Fig. 5, right)": fig_likelihood_vs_robustness(
            rows, out / "likelihood_vs_robustness.png"
        ),
        "Certified vs estimated margins (paper Fig. 4)": fig_certified_vs_estimated(
            rows, margins, out / "certified_vs_estimated.png"
        ),
        "Fixed σ: estimated margins over γ and L (paper Fig. 3)": fig_fixed_sigma_grid(
            rows, out / "fixed_sigma_grid.png"
        ),
        "2-D latent space: aggregate posteriors (top, paper Fig. 6) and prior samples (bottom, paper Fig. 7)": (
            fig_latent_2d(rows, run_dirs, out / "latent_2d.png")
        ),
    }
    if tightness:  # data-free (paper Fig. 2): on request (--tightness), not with every report
        from lipvae.certify.tightness import save_tightness_figure

        figures["Tightness of Theorem 1's terms at the paper's setting (paper Fig. 2)"] = save_tightness_figure(
            out / "tightness.png", samples=20_000
        )
    return {k: v for k, v in figures.items() if v is not None}


PAIRED = "Paired comparison against the standard VAE (paper Fig. 5)"


def paired_tables(rows: list[dict], margins: list) -> list[tuple]:
    """The paired comparison (``lipvae.paired``) of these runs' estimated margins (``margins``: each
    run's table, or None), per run and, with several seeds, per L: one comparison per set of
    inputs the margins were measured on (data and r, p; titled by them where there are several),
    each made only when every Lipschitz run's seed has exactly one standard VAE measured on them."""
    from lipvae.paired import Arm, differences, inputs_words, summarise, unpaired_seeds

    groups: dict[str, list] = {}
    for row, frame in zip(rows, margins):
        lipschitz = row["model"] == "lipschitz" and row.get("enc_L") is not None
        if frame is not None and "index" in frame and (lipschitz or row["model"] == "standard"):
            inputs = row.get("inputs", "")
            groups.setdefault(inputs, []).append(Arm.of_table(
                label(row), "lipschitz" if lipschitz else "standard", row.get("enc_L"), int(row.get("seed") or 0),
                frame.set_index("index"), inputs))
    if {a.kind for arms in groups.values() for a in arms} != {"lipschitz", "standard"}:
        return []
    tables = []
    for inputs, arms in groups.items():
        if not any(a.kind == "lipschitz" for a in arms):
            continue
        of = f": {inputs_words(inputs)}" if len(groups) > 1 else ""  # which inputs, where there are several
        if unpaired := unpaired_seeds(arms):
            tables.append((PAIRED + of, f"Not made: the Lipschitz runs of seed {', '.join(map(str, unpaired))} need"
                           " exactly one standard VAE of the same seed whose margins were measured on the same inputs"
                           " (the same data, read identically, and the same attack r and p).", pd.DataFrame()))
            continue
        table = differences(arms)
        tables.append((PAIRED + of, "Each Lipschitz run against the standard VAE of its seed, on the same attacked"
                       " inputs: the mean difference of their estimated margins, its 95 % bootstrap interval (10,000"
                       " resamples of the inputs), on how many inputs the Lipschitz margin is the larger, and how many"
                       " margins of each are censored (the attack reached attack.max_radius: a lower bound, which"
                       " bounds the difference from one side only).", table))
        if table.seed.nunique() > 1:
            tables.append(("Per L, over seeds" + of,
                           "more robust: every seed's interval above 0 (and no standard VAE margin censored); less"
                           " robust: every one below (and no Lipschitz margin censored); undecided otherwise.",
                           summarise(table)))
    return tables


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    """A table's values as text: differences signed, other numbers to 3 decimals."""
    def one(column: str, v) -> str:
        if isinstance(v, float):
            return f"{v:+.3f}" if column in ("mean_difference", "ci_low", "ci_high", "lowest", "highest") else f"{v:.3f}"
        return str(v)

    return [[one(c, v) for c, v in zip(frame.columns, values)] for values in frame.itertuples(index=False)]


def markdown(page: Page, out: Path) -> str:
    """report.md: context, the key columns per run, runs left out, soundness, figures."""
    rows = page.rows
    md = [f"# lipvae report\n\n{page.headline}\n"]
    md += [f"- **{k}**: {v}" for k, v in page.context]
    md.append("\n| model | " + " | ".join(KEY_COLUMNS) + " |")
    md.append("|" + "---|" * (len(KEY_COLUMNS) + 1))
    for i in page.order:
        md.append(f"| {label(rows[i])} | " + " | ".join(_fmt(rows[i].get(c)) for c in KEY_COLUMNS) + " |")
    md.append("\nEvery column of every run is in `results.csv`.")
    if page.problems:
        md.append("\n## Runs not included\n")
        md += [f"- `{p['run']}`: {p['status']}" for p in page.problems]
    md.append(f"\n**{page.soundness}**\n")
    for title, note, frame in page.tables:
        md.append(f"## {title}\n\n{note}\n")
        if frame.empty:
            continue
        md.append("| " + " | ".join(frame.columns) + " |")
        md.append("|" + "---|" * len(frame.columns))
        md += ["| " + " | ".join(cells) + " |" for cells in _cells(frame)]
        md.append("")
    for title, path in page.figures.items():
        rel = path.name if path.parent == out else str(path)
        md.append(f"## {title}\n\n![{title}]({rel})\n")
    return "\n".join(md) + "\n"


def html_page(page: Page) -> str:
    """report.html: report.md's content in one self-contained file (figures inlined), with every
    column of every run behind a fold; laid out by the package's ``templates/report.html.j2``
    (jinja2, every value escaped)."""
    import jinja2
    import markupsafe

    env = jinja2.Environment(loader=jinja2.PackageLoader("lipvae", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    # a column name may wrap after its underscores, so that the table fits the page
    env.filters["breakable"] = lambda name: markupsafe.escape(name).replace("_", markupsafe.Markup("_<wbr>"))
    shown = [c for c in COLUMNS if c != "run"]
    rows = []
    for i in page.order:
        row, link = page.rows[i], page.rows[i].get("link")
        files = [(f"{link}/{f}", RUN_FIGURES[f]) for f in row.get("files", [])]
        if row.get("wandb_url"):
            files.append((row["wandb_url"], "W&B"))
        rows.append({"run": row["run"], "label": label(row), "link": link, "files": files,
                     "key_cells": [_fmt(row.get(c)) for c in KEY_COLUMNS],
                     "all_cells": [_fmt(row.get(c)) for c in shown]})
    figures = [(title, base64.b64encode(path.read_bytes()).decode()) for title, path in page.figures.items()]
    return env.get_template("report.html.j2").render(
        headline=page.headline, context=page.context, key_columns=KEY_COLUMNS, all_columns=shown, rows=rows,
        problems=page.problems, soundness=page.soundness, figures=figures,
        tables=[(title, note, list(frame.columns), _cells(frame)) for title, note, frame in page.tables])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lipvae.report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One report of the runs found below the folders given: a sweep's, or several sweeps'.\n\n"
        + __doc__.split("\n", 1)[1].strip().replace("``", "'"),
        epilog="exit status: 0 written, 1 runs found but none completed, 2 bad input or no runs (one line)")
    ap.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders (searched for runs below them)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first dir)")
    ap.add_argument("--tightness", action="store_true",
                    help="add the data-free figure of Theorem 1's terms against Monte Carlo (paper Fig. 2)")
    args = ap.parse_args(argv)

    def report() -> int:
        try:
            path = build_report(args.dirs, args.out, args.tightness)
        except NothingCompleted as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"report written: {path} (and report.html, results.csv, figures beside it)")
        return 0

    return command(report, "write the report elsewhere (--out)")


if __name__ == "__main__":
    sys.exit(main())
