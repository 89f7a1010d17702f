"""Lightning callback: estimated margins, the soundness check and attack figures after testing."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from lipvae.attacks import estimate_margins, latent_space_attack
from lipvae.certify.certificates import column_suffix
from lipvae.plots import is_wandb, log_image, save_latent_attack, save_margin_scatter
from lipvae.results import write_table

log = logging.getLogger("lipvae")
TABLE = "margins.csv"
STATE = "attack_state.pt"  # the margin search's state while it runs (attack_state.csv: partial table)


def soundness_violations(table: pd.DataFrame, columns: list[str], slack: float = 1e-9) -> list[int]:
    """Indices of inputs whose certified margin (any form) exceeds the estimated one."""
    if not columns:
        return []
    certified = table[columns].max(axis=1)
    return table.loc[certified > table["estimated"] + slack, "index"].astype(int).tolist()


def other_class_targets(labels: torch.Tensor) -> torch.Tensor:
    """For each input, the position of the next test image (cyclically) of another class."""
    n = len(labels)
    targets = torch.empty(n, dtype=torch.long)
    for i in range(n):
        for k in range(1, n):
            j = (i + k) % n
            if labels[j] != labels[i]:
                targets[i] = j
                break
        else:
            targets[i] = (i + 1) % n
    return targets


class AttackCallback(Callback):
    """After ``trainer.test`` (and after ``CertifyCallback``, whose table it joins):

    - estimated (r, p)-margins of the first ``num_inputs`` test inputs by maximum-damage
      attacks (``lipvae.attacks.estimate_margins``), saved to ``margins.csv`` beside the
      certified margins of the same inputs;
    - the soundness check: inputs whose certified margin exceeds the estimated one are
      logged as errors by index and counted;
    - the latent-space attack figure (paper Fig. 1) and certified-vs-estimated scatter (Fig. 4).
    """

    def __init__(self, run_dir: Path, cfg, certifier=None, seed: int = 0) -> None:
        self.run_dir, self.cfg, self.certifier, self.seed = Path(run_dir), cfg, certifier, seed
        self.summary: dict | None = None
        self.latent: dict | None = None
        self.violations: int | None = None
        self.seconds = 0.0

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning tests under inference mode; attacks need gradients with respect to inputs.
        with torch.inference_mode(False), torch.enable_grad():
            self._attack(trainer, pl_module)

    def _attack(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg, vae = self.cfg, pl_module.vae
        start = time.perf_counter()
        device = pl_module.device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        test = trainer.datamodule.split("test")
        n = min(cfg.num_inputs, len(test))
        x = test.images[:n].to(device)
        est = estimate_margins(
            vae,
            x,
            r=cfg.r,
            p=cfg.p,
            samples=cfg.samples,
            starts=cfg.starts,
            steps=cfg.steps,
            max_radius=cfg.max_radius,
            tol=cfg.tol,
            search=cfg.search,
            grid_step=cfg.grid_step,
            pixel_range=cfg.pixel_range,
            generator=gen,
            progress=trainer.progress_bar_callback is not None,
            state_path=self.run_dir / STATE,  # an interrupted attack continues from here on resume
            method=cfg.method,
            lbfgs=dict(cfg.lbfgs) if cfg.method == "lbfgs" else None,
            seed=self.seed,
        )
        table = pd.DataFrame(
            {
                "index": test.index[:n].numpy(),
                "label": test.labels[:n].numpy(),
                "estimated": est.margin.cpu().numpy(),
                "censored": est.censored.cpu().numpy(),
            }
        )
        cert_cols = self._join_certified(table)
        write_table(self.run_dir / TABLE, table)
        values = table["estimated"].to_numpy()
        self.summary = {
            "r": float(cfg.r),
            "p": float(cfg.p),
            "num_inputs": int(n),
            "mean": float(np.mean(values)),
            "median": float(np.median(values)),
            "min": float(np.min(values)),
            "max": float(np.max(values)),
            "censored": int(table["censored"].sum()),
            "method": cfg.method,
            "search": cfg.search,
            "samples": cfg.samples,
            "starts": cfg.starts,
            "steps": cfg.steps,
            "tol": float(cfg.tol),
            "max_radius": float(cfg.max_radius),
            "pixel_range": bool(cfg.pixel_range),
            "table": TABLE,
        }
        if vae.kind == "lipschitz" and cert_cols:
            bad = soundness_violations(table, cert_cols)
            self.violations = len(bad)
            for i in bad:
                row = table[table["index"] == i].iloc[0]
                log.error(
                    "soundness violation at test input %d: certified %.4g > estimated %.4g "
                    "(a bug, or a Lipschitz constant that does not hold)",
                    i,
                    row[cert_cols].max(),
                    row["estimated"],
                )
        log.info(
            "estimated margins (r=%g, p=%g) on %d inputs: mean %.4g, median %.4g, min %.4g; %d censored at %g%s",
            cfg.r,
            cfg.p,
            n,
            self.summary["mean"],
            self.summary["median"],
            self.summary["min"],
            self.summary["censored"],
            cfg.max_radius,
            "" if self.violations is None else f"; soundness violations: {self.violations}",
        )
        figures = []
        if cert_cols:
            figures.append(
                save_margin_scatter(
                    table,
                    cert_cols,
                    self.run_dir / "certified_vs_estimated.png",
                    title=f"r={cfg.r:g}, p={cfg.p:g}, {n} test inputs",
                )
            )
        figures.append(self._latent_figure(vae, test, device, gen))
        self.seconds = time.perf_counter() - start
        metrics = {f"estimated/{k}": self.summary[k] for k in ("mean", "median", "min", "censored")}
        if self.violations is not None:
            metrics["soundness_violations"] = self.violations
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            if is_wandb(lg):
                lg.log_table(key="margins", dataframe=table)
        for fig in figures:
            log_image(trainer.loggers, fig.stem, fig)

    def _join_certified(self, table: pd.DataFrame) -> list[str]:
        """Add the certified margins computed at the same (r, p) as the attack; their columns."""
        cert = self.certifier
        if cert is None or cert.table is None:
            return []
        r, p = float(self.cfg.r), float(self.cfg.p)
        suffix = column_suffix(cert.r, cert.p, r, p)
        if suffix is None:
            log.warning(
                "attack (r=%g, p=%g) matches no certified (r, p) of %s × %s: no soundness check", r, p, cert.r, cert.p
            )
            return []
        cols = [f"certified_{form}{suffix}" for form in cert.forms]
        by_index = cert.table.set_index("index")
        for col in cols:
            table[col.removesuffix(suffix)] = by_index.loc[table["index"], col].to_numpy()
        return [c.removesuffix(suffix) for c in cols]

    def _latent_figure(self, vae, test, device, gen) -> Path:
        lat = self.cfg.latent
        n = min(lat.num_inputs, len(test))
        targets = other_class_targets(test.labels)[:n]
        x = test.images[:n].to(device)
        xt = test.images[targets].to(device)
        soft = lat.kind == "soft"
        res = latent_space_attack(
            vae, x, xt, 0.0 if soft else lat.budget, starts=1, steps=lat.steps, pixel_range=self.cfg.pixel_range,
            generator=gen, kind=lat.kind, penalty=lat.penalty if soft else 0.0, lr=lat.lr if soft else 0.0,
        )
        self.latent = {
            "kind": lat.kind,
            "budget": None if soft else float(lat.budget),
            "penalty": float(lat.penalty) if soft else None,
            "mean_delta_norm": float(res.delta.norm(dim=-1).mean()),
            "num_inputs": n,
            "mean_kl": float(res.kl.mean()),
            "mean_dist_to_target": float(res.dist_to_target.mean()),
            "mean_dist_to_original": float(res.dist_to_original.mean()),
        }
        return save_latent_attack(x, res, xt, self.run_dir / "latent_attack.png", budget=None if soft else lat.budget)
