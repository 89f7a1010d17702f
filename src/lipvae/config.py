"""Checking a composed config (``validate``, once, before any data is read or any model is
built: the schema's models, then the rules that tie fields together), and the one line for what
Hydra could not compose (``composition_error``). Each check raises ``UserError`` naming the field,
the value given and what is accepted; ``lipvae.build`` builds, ``lipvae.compose`` composes."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lipvae.build import IMAGE_DATA, _entries, _entry_kinds, build_attack, build_certifier, build_layer, target_class
from lipvae.errors import UserError
from lipvae.schema import (ATTACKS, ENTRIES, Closed, ImageDataConfig, OwnAttackConfig, PgdAttackConfig, RootConfig,
                           check, check_node, field_paths, no_such_field, schema_at)

#: (a setting, its value, a field that value needs, what the field accepts)
NEEDED = [("model.encoder_std.mode", "fixed", "model.encoder_std.gamma", "a positive number"),
          ("model.encoder_std.mode", "bounded", "model.encoder_std.max_norm", "a positive number"),
          ("margins.latent.kind", "hard", "margins.latent.budget", "a number >= 0"),
          ("margins.latent.kind", "soft", "margins.latent.penalty", "a number >= 0"),
          ("margins.latent.kind", "soft", "margins.latent.lr", "a positive number"),
          ("model.arch.kind", "conv", "model.arch.channels", "a non-empty list of positive even integers"),
          ("model.arch.kind", "conv", "model.arch.kernel_size", "a positive odd integer")]


def validate(cfg: DictConfig, machine: bool = True) -> None:
    """Check the fields a user sets, before any data is read or any model is built: the schema
    (lipvae.schema), then the rules that tie fields together and (``machine``) those that need
    the machine: a sweep submitted to a cluster leaves those to each job, on the node that runs
    it. Raises ``UserError`` on the first bad one."""
    check_node(cfg, RootConfig)
    if cfg.data.get("_target_", IMAGE_DATA) == IMAGE_DATA:  # another data class checks its own arguments
        check_node(cfg.data, ImageDataConfig, "data.")
    check_node(cfg.attack, ATTACKS.get(cfg.attack.get("_target_"), OwnAttackConfig), "attack.")
    for path, schema in ENTRIES.items():
        if (entry := OmegaConf.select(cfg, path)) is not None:
            check_node(entry, schema, path + ".")
    for setting, value, path, words in NEEDED:
        check(OmegaConf.select(cfg, setting) != value or OmegaConf.select(cfg, path) is not None, path, None, words)
    _check_entry_classes(cfg)  # each callback's and logger's class, before any data is read
    lipschitz = cfg.model.kind == "lipschitz"
    if lipschitz:
        hidden = list(cfg.model.hidden)
        check(all(h % 2 == 0 for h in hidden), "model.hidden", hidden, "even widths (GroupSort groups of 2)")
        build_layer(cfg.model)  # its class and arguments, before any data is read
        if cfg.margins.certify:
            m = cfg.model.latent_dim
            check(m >= 2, "model.latent_dim", m, "an integer >= 2 when certifying (the χ² bound; or margins.certify=false)")
    if machine:
        _validate_devices(cfg)
        _validate_accelerator(cfg)
    if cfg.margins.attack and cfg.attack.get("search") == "grid":
        step, top = cfg.attack.grid_step, cfg.attack.max_radius
        check(top / step <= MAX_GRID, "attack.grid_step", step,
              f"at least attack.max_radius/{MAX_GRID} = {top / MAX_GRID:g} (at most {MAX_GRID} radii per input)")
    check_certified_inputs(cfg.margins, lipschitz)
    if cfg.margins.certify and lipschitz:
        build_certifier(cfg.certify)  # its class and arguments, before any data is read
    if cfg.margins.attack and machine:
        _check_attack_memory(cfg)
        build_attack(cfg.attack)
    if lipschitz and str(cfg.trainer.precision).startswith("64"):
        layer = str(cfg.model.layer.get("_target_", "")).rsplit(".", 1)[-1]
        check(layer in ("BjorckLinear", "AOLLinear"), "trainer.precision", cfg.trainer.precision,
              f"32-true with model/layer={layer.removesuffix('Linear').lower()} (its weights stay float32;"
              " 64-true works with model/layer=bjorck|aol)")


def _check_attack_memory(cfg: DictConfig) -> None:
    """An attack whose latent draws (samples × starts × attacked inputs, all at once) cannot fit in
    this machine's free memory is refused before any work (a lower bound: decoded images need more)."""
    samples, starts, inputs = cfg.attack.get("samples"), cfg.attack.get("starts"), cfg.margins.attacked_inputs
    need = samples * starts * max(inputs, 1) * max(int(cfg.model.latent_dim), 1) * 4
    free = _free_memory()
    if free is not None and need > free:
        raise UserError(f"attack.samples, attack.starts: got {samples} and {starts} for {inputs} inputs, which need"
                        f" at least {need / 2**30:.1f} GiB (samples × starts × inputs latent draws, more for the"
                        f" decoded images); accepted: settings that fit the {free / 2**30:.1f} GiB free here"
                        " (e.g. attack.samples=40 attack.starts=5)")


def _free_memory() -> int | None:
    """Bytes available to a new allocation (Linux's MemAvailable), None elsewhere."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)


def check_certified_inputs(margins: DictConfig, lipschitz: bool) -> None:
    """The certified inputs (the first ``margins.certified_inputs``; null: all) include the attacked
    ones, whose certificates are checked against their estimated margins (validate, evaluate and
    the margin callbacks)."""
    if margins.attack and margins.certify and lipschitz and margins.certified_inputs is not None:
        certified, attacked = margins.certified_inputs, margins.attacked_inputs
        check(certified >= attacked, "margins.certified_inputs", certified,
              f"null, or at least margins.attacked_inputs={attacked} (each attacked input's certificate is checked)")


#: The most radii the grid search may try per input (the reference's grid has 20: step 0.5 up to 10).
MAX_GRID = 1000


def _validate_accelerator(cfg: DictConfig) -> None:
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator: got {accelerator!r}, but no CUDA device is visible; accepted: auto, cpu")
    mps = getattr(torch.backends, "mps", None)
    mps = mps is not None and mps.is_available()
    if accelerator == "mps" and not mps:
        raise UserError("trainer.accelerator: got 'mps', but MPS is not available here; accepted: auto, cpu")
    if str(cfg.trainer.precision).startswith("64") and mps and accelerator in ("mps", "auto") and not torch.cuda.is_available():
        raise UserError(f"trainer.precision: got {cfg.trainer.precision!r} on Apple's MPS, which has no float64;"
                        " accepted: 32-true, or trainer.accelerator=cpu")


def _validate_devices(cfg: DictConfig) -> None:
    devices, accelerator = cfg.trainer.devices, cfg.trainer.accelerator
    if devices in (1, "auto") or cfg.trainer.strategy != "auto":
        return
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise UserError(f"trainer.devices: got {devices} on CPU; accepted: 1, or several with a strategy named"
                        " (trainer.strategy=ddp; each process then trains on a share of the batches)")


def composition_error(e: Exception, overrides: list[str], compose) -> UserError:
    """The one line for what Hydra could not compose, read from the exception's fields (not its
    text): an unknown choice of a group, or a field that does not exist (with the closest one,
    from ``compose(overrides without it)``)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(e, MissingConfigException) and "/" in (e.missing_cfg_file or ""):  # a group's choice
        group, _, choice = e.missing_cfg_file.rpartition("/")
        return UserError(f"{group}: got {choice!r}; accepted: {', '.join(e.options or [])}")
    if not isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)):
        return UserError(str(e).splitlines()[0])
    key = e.__cause__.full_key
    try:
        others = compose([o for o in overrides if o.split("=", 1)[0] != key])
    except Exception:
        return UserError(no_such_field(key, []))
    node, _, leaf = key.rpartition(".")
    schema = _schema_of(node, others)
    theirs = set(PgdAttackConfig.model_fields) - set(schema.model_fields) if node == "attack" else set()
    if leaf in theirs:  # attack=lbfgs attack.steps=5: L-BFGS-B takes none of pgd's settings
        name = str(others.attack.get("_target_", "")).rsplit(".", 1)[-1]
        return UserError(f"{key}: no such field of {name}, which takes none of pgd's {', '.join(sorted(theirs))}")
    closed = not node or isinstance(schema, type) and issubclass(schema, Closed)  # the top level: a typo, not a new key
    hint = "" if closed else f" (to add a new field, write +{key}=...)"
    return UserError(no_such_field(key, field_paths(others)) + hint)


def _schema_of(path: str, cfg: DictConfig):
    """The model that checks the node at ``path``; anything else where the schema leaves the node
    open (``logger``, ``callbacks`` of the user's, a layer's or another class's own arguments).
    The ``data`` and ``attack`` nodes are checked by the model their ``_target_`` selects."""
    group, _, rest = path.partition(".")
    if group not in ("data", "attack"):
        return schema_at(path)
    schema = (ImageDataConfig if cfg.data.get("_target_") == IMAGE_DATA else None) if group == "data" else \
        ATTACKS.get(cfg.attack.get("_target_"), OwnAttackConfig)
    return schema_at(rest, schema) if schema is not None else None


def _check_entry_classes(cfg: DictConfig) -> None:
    for path, (base, accepted) in _entry_kinds().items():
        for field, spec in _entries(cfg, path).items():
            target_class(field, spec._target_, base, accepted)
