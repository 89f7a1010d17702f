"""Lightning callback: certified margins computed, saved and logged after every test."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from lipvae.certify.certificates import certify_test_split
from lipvae.plots import is_wandb, log_image, save_margin_histogram
from lipvae.results import write_table

log = logging.getLogger("lipvae")
TABLE = "certified_margins.csv"


class CertifyCallback(Callback):
    """After ``trainer.test``: per-input certificates of the first ``num_inputs`` test inputs
    (all when None) for every configured r, p and form. Standard VAEs get none (their
    constants are unknown): ``summary`` stays None."""

    def __init__(self, run_dir: Path, r, p, forms, num_inputs=None, batch_size: int = 1000) -> None:
        self.run_dir = Path(run_dir)
        self.r, self.p, self.forms = list(r), list(p), list(forms)
        self.num_inputs, self.batch_size = num_inputs, batch_size
        self.summary: dict | None = None
        self.table = None
        self.seconds = 0.0

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        vae = pl_module.vae
        if vae.kind != "lipschitz":
            log.info("standard VAE: its Lipschitz constants are unknown, so no certificate (certified: null)")
            return
        start = time.perf_counter()
        table, summary = certify_test_split(
            vae,
            trainer.datamodule.split("test"),
            self.num_inputs,
            vae.lipschitz_constants(),
            self.r,
            self.p,
            self.forms,
            self.batch_size,
        )
        write_table(self.run_dir / TABLE, table)
        summary["table"] = TABLE
        self.seconds = time.perf_counter() - start
        self.summary, self.table = summary, table
        log.info(
            "certified (r=%g, p=%g, %s form) on %d inputs: mean %.4g, median %.4g, min %.4g, certified %.1f%%%s",
            summary["r"],
            summary["p"],
            summary["form"],
            summary["num_inputs"],
            summary["mean"],
            summary["median"],
            summary["min"],
            100 * summary["fraction_certified"],
            "" if summary["global_margin"] is None else f", global margin {summary['global_margin']:.4g}",
        )
        metrics = {
            f"certified/{k}": v
            for k, v in summary.items()
            if k in ("mean", "median", "min", "fraction_certified", "global_margin") and v is not None
        }
        figure = save_margin_histogram(
            {f: table[f"certified_{f}"].to_numpy() for f in self.forms},
            self.run_dir / "certified_margins.png",
            title=f"certified margins, r={summary['r']:g}, p={summary['p']:g}",
        )
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            if is_wandb(lg):
                lg.log_table(key="certified_margins", dataframe=table.head(10000))
        log_image(trainer.loggers, "certified_margins_hist", figure)
