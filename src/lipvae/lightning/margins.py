"""lipvae's margins as Lightning callbacks, for any ``Trainer`` whose module holds a lipvae VAE
(as ``module.vae``):

    trainer = L.Trainer(max_epochs=5, callbacks=[
        CertifiedMargins(r=[8.0], p=[0.5]),
        EstimatedMargins(num_inputs=25, samples=40, starts=5, steps=100),
    ], default_root_dir="outputs/mine")
    trainer.fit(module, datamodule=data)
    # outputs/mine/evaluation.json: certified and estimated margins, soundness violations

When fitting ends, the first of them in the trainer's list runs the one evaluation pipeline
(``lipvae.evaluation.evaluate``: certify, attack, soundness check, tables and figures) once, with
the settings of all of them, on a frozen copy of the best checkpoint's weights (or of the last
ones): the trained module is left as fitting left it, and the global random state as it was.
The callbacks hold settings only; what the pipeline finds is written to the run folder
(``evaluation.json`` beside the tables) and logged to the trainer's loggers. They are the adapter
for Trainers of the user's: ``lipvae.train`` calls the same pipeline itself, after fitting and
freezing, with its ``certify`` and ``attack`` groups' settings.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from lipvae.certify.certificates import COUPLED_DEFAULTS, check_lipschitz
from lipvae.config import check_certified_inputs
from lipvae.errors import UserError
from lipvae.evaluation import check_radii, evaluate, test_split, write_evaluation
from lipvae.results import code_version
from lipvae.safety import packaged_config
from lipvae.stored import load_best_weights

log = logging.getLogger("lipvae")


class MarginCallback(Callback):
    """What the margin callbacks share: the trigger at the end of fitting. ``dirpath``: where the
    evaluation is written (default: the trainer's ``default_root_dir``); ``weights``: best (the
    checkpoint of the trainer's ModelCheckpoint with the lowest monitored value, where there is
    one) or last (the weights as fitting left them); ``enabled=False``: this part is not computed."""

    section = ""  # certify | attack: the part of the evaluation's settings this callback holds

    def __init__(self, dirpath: str | Path | None = None, weights: str = "best", seed: int = 0,
                 eval_batch_size: int = 1000, enabled: bool = True) -> None:
        if weights not in ("best", "last"):
            raise UserError(f"weights: got {weights!r}; accepted: best, last")
        self.dirpath, self.weights, self.seed, self.eval_batch_size = dirpath, weights, seed, eval_batch_size
        self.enabled = bool(enabled)

    def settings(self) -> dict:
        raise NotImplementedError

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The callbacks' settings together, checked before training rather than after it."""
        margin_callbacks = [cb for cb in trainer.callbacks if isinstance(cb, MarginCallback)]
        if margin_callbacks[0] is self:
            cfg = evaluation_settings(margin_callbacks)
            lipschitz = pl_module.vae.kind == "lipschitz"
            check_certified_inputs(cfg.margins, lipschitz)
            check_radii(cfg, pl_module.vae.input_shape, lipschitz)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        margin_callbacks = [cb for cb in trainer.callbacks if isinstance(cb, MarginCallback)]
        if margin_callbacks[0] is self and trainer.is_global_zero:  # the pipeline runs once, on one process
            evaluate_at_fit_end(trainer, pl_module, margin_callbacks)


class CertifiedMargins(MarginCallback):
    """Certified margins (docs/math.md §3) of the frozen model at every (r, p) of ``r`` × ``p``
    for each of ``forms`` (the first is summarised), on the first ``num_inputs`` test inputs
    (None: all). ``coupled``: the coupled form's samples, alpha and seed."""

    section = "certify"

    def __init__(self, r=(8.0,), p=(0.5,), forms=("tight", "exact", "paper"), num_inputs: int | None = None,
                 coupled: dict | None = None, **common) -> None:
        super().__init__(**common)
        self.r, self.p, self.forms, self.num_inputs = list(r), list(p), list(forms), num_inputs
        self.coupled = dict(coupled or COUPLED_DEFAULTS)

    def settings(self) -> dict:
        return {"_target_": CERTIFIER, "r": self.r, "p": self.p, "forms": self.forms, "coupled": self.coupled}


class EstimatedMargins(MarginCallback):
    """Estimated margins by the maximum-damage attack (conf/attack/pgd.yaml names every setting;
    ``attack``: their values, an ``attack`` config node with another ``_target_`` included, or
    keyword arguments one by one), with the soundness check against the certified margins when a
    CertifiedMargins callback certifies the same (r, p)."""

    section = "attack"

    def __init__(self, attack=None, dirpath=None, weights: str = "best", seed: int = 0,
                 eval_batch_size: int = 1000, num_inputs: int | None = None, latent: dict | None = None,
                 enabled: bool = True, **settings) -> None:
        if OmegaConf.is_config(attack):
            attack = OmegaConf.to_container(attack, resolve=True)
        given, defaults = {**(attack or {}), **settings}, default_attack()
        # which inputs, and the latent attack, may come with the attack's settings too (a run's config
        # node and the margins group's fields, merged): they are the evaluation's, not the attack's
        num_inputs = given.pop("num_inputs", given.pop("attacked_inputs", num_inputs))
        latent, enabled = given.pop("latent", latent), given.pop("enabled", enabled)
        if given.get("_target_", defaults["_target_"]) != defaults["_target_"]:
            defaults = {k: v for k, v in defaults.items() if k in COMMON_FIELDS}  # not pgd's own fields
        super().__init__(dirpath=dirpath, weights=weights, seed=seed, eval_batch_size=eval_batch_size, enabled=enabled)
        margins = default_margins()
        self.num_inputs = int(num_inputs) if num_inputs is not None else margins["attacked_inputs"]
        self.latent = {**margins["latent"], **(latent or {})}
        self.attack = {**defaults, **given}  # the attack class's arguments

    def settings(self) -> dict:
        return dict(self.attack)


def default_attack() -> dict:
    """The attack's default arguments: the packaged conf/attack/pgd.yaml on the settings every
    attack takes (conf/attack/base/common.yaml)."""
    return {**packaged_config("attack", "base", "common.yaml"), **packaged_config("attack", "pgd.yaml")}


def default_margins() -> dict:
    """The packaged conf/margins/default.yaml with its latent attack (conf/margins/latent/hard.yaml)."""
    return {**packaged_config("margins", "default.yaml"), "latent": packaged_config("margins", "latent", "hard.yaml")}


#: the settings every attack takes (conf/attack/base/common.yaml)
COMMON_FIELDS = ("r", "p", "samples", "starts", "max_radius", "grid_step", "pixel_range")
CERTIFIER = "lipvae.certify.certificates.Certifier"


def evaluation_settings(callbacks: list[MarginCallback]) -> DictConfig:
    """The evaluation's settings of the margin callbacks (each holds its section), as ``evaluate`` reads them."""
    certify = next((cb for cb in callbacks if cb.section == "certify"), None)
    attack = next((cb for cb in callbacks if cb.section == "attack"), None)
    defaults = default_margins()
    return OmegaConf.create({
        "certify": certify.settings() if certify else {"_target_": CERTIFIER},
        "attack": attack.settings() if attack else default_attack(),
        "margins": {"certify": bool(certify and certify.enabled), "certified_inputs": certify.num_inputs if certify else None,
                    "attack": bool(attack and attack.enabled),
                    "attacked_inputs": attack.num_inputs if attack else defaults["attacked_inputs"],
                    "latent": attack.latent if attack else defaults["latent"]},
        "data": {"eval_batch_size": callbacks[0].eval_batch_size},
    })


def evaluate_at_fit_end(trainer: L.Trainer, pl_module: L.LightningModule, callbacks: list[MarginCallback]) -> Path:
    """Run the evaluation pipeline with the callbacks' settings on a frozen copy of the module's
    VAE (best weights unless asked otherwise) and write ``evaluation.json`` to the run folder;
    its path. The module, and the global random state, stay as fitting left them."""
    first = callbacks[0]
    out_dir = Path(first.dirpath or trainer.default_root_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = evaluation_settings(callbacks)
    progress = trainer.progress_bar_callback is not None
    start = time.perf_counter()
    pl_module._evaluating_margins = True  # a stop now keeps training's last checkpoint (SaveOnException)
    try:
        with torch.random.fork_rng(devices=[]):  # what runs after fitting draws as it would without them
            vae, epoch = frozen_copy(trainer, pl_module, first.weights)
            ev = evaluate(vae, test_split(trainer.datamodule), cfg, out_dir, first.seed, loggers=trainer.loggers,
                          step=trainer.global_step, progress=progress)
    finally:
        pl_module._evaluating_margins = False
    record = {
        "evaluated_epoch": epoch, "weights": first.weights, "code": code_version(), **ev.results(),
        "timings": ev.timings(time.perf_counter() - start),
        "config": {**OmegaConf.to_container(cfg, resolve=True), "seed": first.seed},
    }
    path = write_evaluation(out_dir, record)
    log.info("margins written to %s", path)
    return path


def frozen_copy(trainer: L.Trainer, pl_module: L.LightningModule, weights: str):
    """A frozen copy of the module's VAE holding the best checkpoint's weights (``weights="best"``,
    where the trainer's ModelCheckpoint has one) or the module's own; and the (1-based) epoch
    whose weights it holds."""
    vae = copy.deepcopy(pl_module.vae)
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") if weights == "best" and ckpt is not None else ""
    epoch = load_best_weights(vae, best, trainer.current_epoch, what="margins of")
    vae.freeze()
    if vae.kind == "lipschitz":
        check_lipschitz(vae.lipschitz_constants())
    return vae, epoch

