"""One evaluation pipeline over a frozen model: certify → attack → soundness check → tables and
figures, and the record it writes (``evaluation.json``). ``lipvae.train`` runs it when fitting
ends (through the margin callbacks); ``python -m lipvae.evaluate`` (``lipvae.evaluate``, the
command) runs it again on a finished run."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from lipvae.attack import latent_space_attack
from lipvae.build import build_attack, build_certifier
from lipvae.config import check_certified_inputs
from lipvae.errors import UserError
from lipvae.schema import check
from lipvae.certify.bounds import SAMPLED_FORMS
from lipvae.certify.certificates import column_suffix
from lipvae.plots import is_wandb, log_image, save_latent_attack, save_margin_histogram, save_margin_scatter
from lipvae.results import Results, atomic_write_text, write_table

log = logging.getLogger("lipvae")
CERTIFIED_TABLE = "certified_margins.csv"
MARGINS_TABLE = "margins.csv"
STATE = "attack_state.pt"  # the margin search's state while it runs (attack_state.csv: partial table)
EVALUATION_FILE = "evaluation.json"  # an evaluation's record (docs/results.md), beside its tables
#: the files an evaluation writes into its folder
OUTPUTS = (CERTIFIED_TABLE, MARGINS_TABLE, "certified_margins.png", "certified_vs_estimated.png", "latent_attack.png")


@dataclass
class Evaluation:
    certified: dict | None = None
    estimated: dict | None = None
    latent_attack: dict | None = None
    soundness_violations: int | None = None
    coupled_exceedances: dict | None = None
    certify_s: float = 0.0
    attack_s: float = 0.0

    def timings(self, total_s: float) -> dict:
        """Seconds spent certifying, attacking, and in all (``total_s``)."""
        return {"certify_s": self.certify_s, "attack_s": self.attack_s, "total_s": total_s}

    def results(self) -> dict:
        """The parts of results.json an evaluation owns, always written together."""
        return {part: getattr(self, part) for part in Results.EVALUATION_PARTS}

    @classmethod
    def from_record(cls, record: dict) -> Evaluation:
        """The evaluation an ``evaluation.json`` record holds (``write_evaluation``)."""
        timings = record.get("timings") or {}
        return cls(**{part: record.get(part) for part in Results.EVALUATION_PARTS},
                   certify_s=timings.get("certify_s", 0.0), attack_s=timings.get("attack_s", 0.0))


def check_radii(cfg: DictConfig, input_shape, lipschitz: bool) -> None:
    """Every reconstruction lies in [0, 1]^D (the decoder ends in a sigmoid), so two of them are
    less than √D apart: at a radius r ≥ √D no input's reconstruction can ever move by more than r,
    every margin would be infinite and every estimate censored. Refused once the data's shape
    (D values per input) is known, before any training or evaluation."""
    values = math.prod(int(s) for s in input_shape)
    top = values**0.5
    radii = []  # (field, its value as given, its largest radius)
    if cfg.margins.certify and lipschitz:
        radii.append(("certify.r", list(cfg.certify.r), max(cfg.certify.r)))
    if cfg.margins.attack:
        radii.append(("attack.r", float(cfg.attack.r), float(cfg.attack.r)))
    for field, given, largest in radii:
        check(largest < top, field, given, f"radii below √D = {top:.4g}, the farthest two reconstructions of these"
              f" inputs (D = {values} values in [0, 1]) can be apart")


def soundness_violations(table: pd.DataFrame, columns: list[str], slack: float = 1e-9) -> list[int]:
    """Indices of inputs whose certified margin (any form of ``columns``) exceeds the estimated
    one (censored estimates excepted, ``_exceeds``)."""
    return table.loc[_exceeds(table, columns, slack), "index"].astype(int).tolist() if columns else []


def _exceeds(table: pd.DataFrame, columns: list[str], slack: float) -> pd.Series:
    """Rows whose largest certified margin in ``columns`` exceeds an estimated margin the attack
    reached (an upper estimate of the margin). A censored one (the input still robust at
    attack.max_radius) says only that no breaking δ was found that far: no certificate contradicts it."""
    over = table[columns].max(axis=1) > table["estimated"] + slack
    return over & ~table["censored"].astype(bool) if "censored" in table else over


def probabilistic(column: str) -> bool:
    """Whether a certified column is of a form that holds only with probability 1 − α (coupled)."""
    return any(column == f"certified_{form}" or column.startswith(f"certified_{form}_") for form in SAMPLED_FORMS)


def coupled_exceedances(table: pd.DataFrame, columns: list[str], alpha: float, slack: float = 1e-9) -> dict | None:
    """How often a probabilistic (coupled) certificate exceeds the estimated margin, beside the
    α·N such exceedances its guarantee allows (it holds per input with probability ≥ 1 − α over
    the certifier's samples). Not a soundness violation; None without a probabilistic column."""
    cols = [c for c in columns if probabilistic(c)]
    if not cols:
        return None
    over = _exceeds(table, cols, slack)
    n = len(table)
    return {"observed": int(over.sum()), "expected": float(alpha * n), "inputs": n, "alpha": float(alpha),
            "indices": table.loc[over, "index"].astype(int).tolist()}


def other_class_targets(labels: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """For each of the first ``n`` inputs (None: all), the position of the next test image
    (cyclically) of another class; the next image where there is none (unlabelled data: -1 for
    all). One vectorised scan per input: O(n · len(labels)), not quadratic in the test split."""
    labels = labels.cpu()
    total = len(labels)
    targets = torch.empty(total if n is None else min(n, total), dtype=torch.long)
    for i in range(len(targets)):
        after = torch.roll(labels, -(i + 1))  # the labels at positions i + 1, i + 2, ... (cyclically)
        other = torch.nonzero(after != labels[i])
        targets[i] = (i + 1 + (int(other[0]) if len(other) else 0)) % total
    return targets


@dataclass
class Output:
    """Where an evaluation's files and metrics go: its folder, the loggers (at ``step``), and
    whether progress bars are drawn."""

    dir: Path
    loggers: tuple | list = ()
    step: int = 0
    progress: bool = True


def test_split(datamodule):
    """The test inputs of a data module: its ``split('test')`` (lipvae's data modules), or the
    batches of its test loader with their positions as indices."""
    from lipvae.data import TensorBatches

    if datamodule is not None and hasattr(datamodule, "split"):
        return datamodule.split("test")
    loader = datamodule.test_dataloader() if datamodule is not None else None
    if loader is None:
        raise UserError("margins: no datamodule with test data (fit with datamodule=...)")
    images, labels = [], []
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
        images.append(x.flatten(1))
        labels.append(torch.zeros(len(x), dtype=torch.long) if y is None else y)
    images, labels = torch.cat(images), torch.cat(labels)
    return TensorBatches(images, labels, torch.arange(len(images)))


def evaluate(
    vae,
    test,
    cfg: DictConfig,
    out_dir: Path,
    seed: int,
    loggers=(),
    step: int = 0,
    progress: bool = True,
    reuse: pd.DataFrame | None = None,
    reuse_latent: dict | None = None,
) -> Evaluation:
    """Certify the first ``cfg.margins.certified_inputs`` test inputs (Lipschitz VAEs) with the
    ``certify`` group's certifier, attack the first ``cfg.margins.attacked_inputs`` with the
    ``attack`` group's attack, check that no certificate exceeds its estimated margin, and write
    the tables and figures to ``out_dir``. ``reuse``: an earlier evaluation's margins table
    (same attack settings) whose estimated margins are taken instead of attacking again."""
    check_certified_inputs(cfg.margins, vae.kind == "lipschitz")
    out = Output(Path(out_dir), loggers, step, progress)
    ev = Evaluation()
    cert_table = None
    if cfg.margins.certify and vae.kind == "lipschitz":
        start = time.perf_counter()
        cert_table, ev.certified = _certify(vae, test, cfg, cfg.data.eval_batch_size, out)
        ev.certify_s = time.perf_counter() - start
    elif cfg.margins.certify:
        log.info("standard VAE: its Lipschitz constants are unknown, so no certificate (certified: null)")
    if cfg.margins.attack:
        start = time.perf_counter()
        # Lightning tests under inference mode; attacks need gradients with respect to inputs
        with torch.inference_mode(False), torch.enable_grad():
            _attack(ev, vae, test, cfg, cert_table, seed, out, reuse, reuse_latent)
        ev.attack_s = time.perf_counter() - start
    return ev


def _certify(vae, test, cfg: DictConfig, batch_size: int, out: Output):
    cc = cfg.certify
    table, summary = build_certifier(cc).certify_split(vae, test, cfg.margins.certified_inputs, batch_size)
    write_table(out.dir / CERTIFIED_TABLE, table)
    summary["table"] = CERTIFIED_TABLE
    held = summary.get("holds_with_probability", 1.0)
    log.info(
        "certified (r=%g, p=%g, %s form) on %d inputs: mean %.4g, median %.4g, min %.4g, certified %.1f%%%s%s",
        summary["r"], summary["p"], summary["form"], summary["num_inputs"], summary["mean"], summary["median"],
        summary["min"], 100 * summary["fraction_certified"],
        "" if summary["global_margin"] is None else f", global margin {summary['global_margin']:.4g}",
        "" if held >= 1 else f"; each holds with probability >= {held:g} over the certifier's samples, not surely",
    )
    metrics = {
        f"certified/{k}": v
        for k, v in summary.items()
        if k in ("mean", "median", "min", "fraction_certified", "global_margin", "holds_with_probability") and v is not None
    }
    figure = save_margin_histogram(
        {f: table[f"certified_{f}"].to_numpy() for f in cc.forms},
        out.dir / "certified_margins.png",
        title=f"certified margins, r={summary['r']:g}, p={summary['p']:g}",
    )
    for lg in out.loggers:
        lg.log_metrics(metrics, step=out.step)
        if is_wandb(lg):
            lg.log_table(key="certified_margins", dataframe=table.head(10000))
    log_image(out.loggers, "certified_margins_hist", figure)
    return table, summary


def _attack(ev: Evaluation, vae, test, cfg: DictConfig, cert_table, seed: int, out: Output, reuse, reuse_latent):
    """Estimate the margins (or take ``reuse``'s), join the certificates at the attack's (r, p),
    check soundness, run the latent-space attack, and write, log and draw the results."""
    ac = cfg.attack
    device = next(vae.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    n = min(cfg.margins.attacked_inputs, len(test))
    if n < cfg.margins.attacked_inputs:
        log.warning("margins.attacked_inputs=%d, but the test split holds only %d: all of them are attacked",
                    cfg.margins.attacked_inputs, n)
    attack = build_attack(ac)
    table = _estimate(attack, vae, test, n, gen, seed, out) if reuse is None else _reused(reuse)
    cert_cols = _join_certified(table, cert_table, cfg.certify, float(ac.r), float(ac.p))
    write_table(out.dir / MARGINS_TABLE, table)
    ev.estimated = _estimated_summary(table, attack, ac, n)
    if vae.kind == "lipschitz" and cert_cols:
        _check_soundness(ev, table, cert_cols, cfg, n)
    log.info(
        "estimated margins (r=%g, p=%g) on %d inputs: mean %.4g, median %.4g, min %.4g; %d censored at %g%s",
        ac.r, ac.p, n, ev.estimated["mean"], ev.estimated["median"], ev.estimated["min"],
        ev.estimated["censored"], ac.max_radius,
        "" if ev.soundness_violations is None else f"; soundness violations: {ev.soundness_violations}",
    )
    if ev.estimated["censored"]:
        log.warning("%d of %d estimated margins are censored: no perturbation up to attack.max_radius=%g was found to"
                    " move the reconstruction by more than r=%g, so they are recorded as %g and the mean understates"
                    " them; a larger attack.max_radius measures them", ev.estimated["censored"], n, ac.max_radius,
                    ac.r, ac.max_radius)
    figures = []
    if cert_cols:
        figures.append(save_margin_scatter(
            table, cert_cols, out.dir / "certified_vs_estimated.png", title=f"r={ac.r:g}, p={ac.p:g}, {n} test inputs"
        ))
    if reuse_latent is not None:
        ev.latent_attack = reuse_latent
    else:
        ev.latent_attack, figure = _latent_attack(vae, test, cfg.margins.latent, bool(ac.pixel_range), device, gen, out.dir)
        figures.append(figure)
    metrics = {f"estimated/{k}": ev.estimated[k] for k in ("mean", "median", "min", "censored")}
    if ev.soundness_violations is not None:
        metrics["soundness_violations"] = ev.soundness_violations
    for lg in out.loggers:
        lg.log_metrics(metrics, step=out.step)
        if is_wandb(lg):
            lg.log_table(key="margins", dataframe=table)
    for fig in figures:
        log_image(out.loggers, fig.stem, fig)


def _estimate(attack, vae, test, n: int, gen, seed: int, out: Output) -> pd.DataFrame:
    """The attack's estimated margins of the first ``n`` test inputs, as the margins table."""
    device = next(vae.parameters()).device
    est = attack.estimate(
        vae, test.images[:n].to(device), generator=gen, seed=seed, progress=out.progress,
        state_path=out.dir / STATE,  # an interrupted attack continues from here on resume
    )
    return pd.DataFrame({
        "index": test.index[:n].numpy(),
        "label": test.labels[:n].numpy(),
        "estimated": est.margin.cpu().numpy(),
        "censored": est.censored.cpu().numpy(),
    })


def _reused(stored: pd.DataFrame) -> pd.DataFrame:
    log.info("estimated margins reused from the stored evaluation (same attack settings)")
    return stored[["index", "label", "estimated", "censored"]].copy()


def _estimated_summary(table: pd.DataFrame, attack, ac: DictConfig, n: int) -> dict:
    """results.json's ``estimated``: the margins' statistics and the search's settings as the
    attack has them (None where it has no such setting: L-BFGS-B's grid has no projected-gradient
    steps or bisection tolerance)."""
    values = table["estimated"].to_numpy()
    return {
        "r": float(ac.r), "p": float(ac.p), "num_inputs": int(n),
        "mean": float(np.mean(values)), "median": float(np.median(values)),
        "min": float(np.min(values)), "max": float(np.max(values)),
        "censored": int(table["censored"].sum()),
        "method": attack.name or type(attack).__name__, "search": getattr(attack, "search", None),
        "samples": ac.samples, "starts": ac.starts, "steps": getattr(attack, "steps", None),
        "tol": getattr(attack, "tol", None), "max_radius": float(ac.max_radius), "pixel_range": bool(ac.pixel_range),
        "table": MARGINS_TABLE,
    }


def _check_soundness(ev: Evaluation, table: pd.DataFrame, cert_cols: list[str], cfg: DictConfig, n: int) -> None:
    """No deterministic certificate may exceed the estimated margin (``soundness_violations``;
    each one is logged); the coupled form's exceedances are counted against what α allows."""
    alpha = float(cfg.certify.coupled.alpha) if "coupled" in cfg.certify else 0.0
    ev.coupled_exceedances = coupled_exceedances(table, cert_cols, alpha)
    if ev.coupled_exceedances is not None:
        log.info("coupled certificates above the estimated margin: %d of %d inputs (expected at most about"
                 " α·N = %.3g; the coupled form holds with probability >= %g per input)",
                 ev.coupled_exceedances["observed"], n, alpha * n, 1 - alpha)
    bad = soundness_violations(table, [c for c in cert_cols if not probabilistic(c)])
    ev.soundness_violations = len(bad)
    for i in bad:
        row = table[table["index"] == i].iloc[0]
        log.error(
            "soundness violation at test input %d: certified %.4g > estimated %.4g "
            "(a bug, or a Lipschitz constant that does not hold)", i, row[cert_cols].max(), row["estimated"],
        )


def _join_certified(table, cert_table, cc, r: float, p: float) -> list[str]:
    """Add the certified margins computed at the attack's (r, p); their columns."""
    if cert_table is None:
        return []
    suffix = column_suffix(list(cc.r), list(cc.p), r, p)
    if suffix is None:
        log.warning("attack (r=%g, p=%g) matches no certified (r, p) of %s × %s: no soundness check",
                    r, p, list(cc.r), list(cc.p))
        return []
    by_index = cert_table.set_index("index")  # every attacked input is certified (check_certified_inputs)
    cols = [f"certified_{form}{suffix}" for form in cc.forms]
    for col in cols:
        table[col.removesuffix(suffix)] = by_index.loc[table["index"], col].to_numpy()
    return [c.removesuffix(suffix) for c in cols]


def _latent_attack(vae, test, lat, pixel_range: bool, device, gen, out_dir: Path):
    n = min(lat.num_inputs, len(test))
    targets = other_class_targets(test.labels, n)
    x, xt = test.images[:n].to(device), test.images[targets].to(device)
    soft = lat.kind == "soft"
    res = latent_space_attack(
        vae, x, xt, 0.0 if soft else lat.budget, starts=1, steps=lat.steps, pixel_range=pixel_range,
        generator=gen, kind=lat.kind, penalty=lat.penalty if soft else 0.0, lr=lat.lr if soft else 0.0,
    )
    summary = {
        "kind": lat.kind,
        "budget": None if soft else float(lat.budget),
        "penalty": float(lat.penalty) if soft else None,
        "mean_delta_norm": float(res.delta.norm(dim=-1).mean()),
        "num_inputs": n,
        "mean_kl": float(res.kl.mean()),
        "mean_dist_to_target": float(res.dist_to_target.mean()),
        "mean_dist_to_original": float(res.dist_to_original.mean()),
        # the share of inputs whose reconstruction ends nearer the target's than their own, and
        # the median share of the way from the input's reconstruction to the target's it moved
        # (a blurrier model's reconstructions sit closer together, so distances alone mislead)
        "closer_to_target": float((res.dist_to_target < res.dist_to_original).float().mean()),
        "median_share_moved": float((res.dist_to_original / res.clean_gap.clamp_min(1e-12)).median()),
    }
    figure = save_latent_attack(x, res, xt, out_dir / "latent_attack.png", budget=None if soft else lat.budget,
                                shape=getattr(vae, "input_shape", None))
    return summary, figure


def write_evaluation(out_dir: Path, record: dict) -> Path:
    """An evaluation's record as ``evaluation.json`` in its folder, atomically."""
    path = Path(out_dir) / EVALUATION_FILE
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def read_evaluation(out_dir: Path) -> dict | None:
    """The record ``write_evaluation`` left in ``out_dir`` (None: none there)."""
    path = Path(out_dir) / EVALUATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None
