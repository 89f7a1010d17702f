"""Configs recorded by an older lipvae, renamed to today's fields: the one migration that every
reader of a stored config goes through (``lipvae.stored.complete_config``, the resume check)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

#: fields that moved when each config group became one object (lipvae 2026-12): old → new
MOVED = {
    "model.lr": "module.lr",
    "trainer.num_importance": "module.num_importance",
    "trainer.patience": "callbacks.early_stopping.patience",
    "trainer.evaluate": "evaluate",
    "trainer.finetune": "callbacks.finetune",
}
#: ... and a field that went: the run's name is `name`
DROPPED = ("model.run_name",)
#: the attack of a run recorded before the attack group had a ``_target_``, by its ``method``
ATTACK_TARGETS = {"pgd": "lipvae.attack.PGDAttack", "lbfgs": "lipvae.attack.LBFGSAttack"}
#: the layers of runs recorded when ``model.layer`` was a name
LEGACY_LAYERS = {"bjorck": "lipvae.networks.BjorckLinear", "aol": "lipvae.networks.AOLLinear"}
_BJORCK = "lipvae.networks.BjorckLinear"
#: the input shape of weights saved before a VAE's state dict held its data's shape: the data
#: sets lipvae could read then (MNIST, Fashion-MNIST) were all 28 × 28 grey-scale images
LEGACY_INPUT_SHAPE = (1, 28, 28)


def migrate_config(cfg: DictConfig) -> DictConfig:
    """A run's config as today's groups name its fields: ``MOVED`` fields at their new place,
    ``DROPPED`` ones gone, Björck's settings (``model.bjorck``) on the Björck layer, a layer
    given by name made its node, an attack named by ``method`` its ``_target_``, the loggers
    entries of ``logger`` (``csv: false`` and W&B's ``enabled: false``: no such entry). A
    config of today is returned as it is. Interpolations are kept where their target stays."""
    old = OmegaConf.to_container(cfg, resolve=False)
    model = old.get("model") or {}
    attack = old.get("attack") or {}
    legacy = (*MOVED, *DROPPED, "model.bjorck", "logger.csv", "logger.extra", "logger.wandb.enabled", "attack.method")
    if not any(_has(old, k) for k in legacy) \
            and not isinstance(model.get("layer"), str):
        return cfg
    if "method" in attack and "_target_" not in attack:
        attack["_target_"] = ATTACK_TARGETS.get(attack["method"], attack["method"])
    attack.pop("method", None)
    bjorck = OmegaConf.to_container(cfg.model.bjorck, resolve=True) if _has(old, "model.bjorck") else {}
    if "run_name" in model and "model.run_name" in str(old.get("name", "")):  # name: ${model.run_name}
        old["name"] = str(old["name"]).replace("${model.run_name}", str(model["run_name"]))
    model.pop("bjorck", None)
    layer = model.get("layer")
    if isinstance(layer, str):
        layer = {"_target_": LEGACY_LAYERS.get(layer, layer), "_partial_": True}
    if isinstance(layer, dict) and layer.get("_target_") == _BJORCK:
        layer.update({k: bjorck[k] for k in ("iters", "beta", "project_iters") if k in bjorck})
    if layer is not None:
        model["layer"] = layer
    for source, target in MOVED.items():
        if _has(old, source):
            _put(old, target, _pop(old, source))
    for key in DROPPED:
        _pop(old, key)
    logger = old.get("logger") or {}
    wandb = logger.get("wandb")
    if isinstance(wandb, dict) and "enabled" in wandb:  # loggers are entries of `logger`; null: none
        logger["wandb"] = {k: v for k, v in wandb.items() if k != "enabled"} if wandb["enabled"] else None
    if logger.pop("csv", None) is False:
        logger["csv"] = None
    logger.update(logger.pop("extra", None) or {})
    return OmegaConf.create(old)


def _has(node: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _pop(node: dict, key: str):
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node.pop(leaf, None) if isinstance(node, dict) else None


def _put(node: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        node[leaf].update(value)
    else:
        node[leaf] = value
