"""From a composed Hydra config to objects, with every user-facing field checked first.

Each check raises ``UserError`` with one line naming the field, the value given and
what is accepted, before any data is read or any model is built.
"""

from __future__ import annotations

import math
import numbers
import re

import torch
from omegaconf import DictConfig, OmegaConf

from lipvae.attacks import LATENT_KINDS, METHODS
from lipvae.certify.bounds import FORMS
from lipvae.data import DATASETS, ImageDataModule, check_root
from lipvae.errors import UserError
from lipvae.networks import LAYERS
from lipvae.vae import KINDS, LIKELIHOODS, STD_MODES, VAE


def _number(cfg: DictConfig, path: str):
    try:
        value = OmegaConf.select(cfg, path, throw_on_missing=True)
    except Exception as e:  # interpolation or missing-value errors
        raise UserError(f"{path}: cannot be resolved ({e.__class__.__name__}: {e})") from None
    return value


def _check(ok: bool, path: str, value, accepted: str) -> None:
    if not ok:
        raise UserError(f"{path}: got {value!r}; accepted: {accepted}")


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(cfg: DictConfig, path: str, integer: bool = False) -> None:
    v = _number(cfg, path)
    kind = "integer" if integer else "number"
    ok = _is_int(v) if integer else (_is_num(v) and math.isfinite(v))
    _check(ok and v > 0, path, v, f"a positive {kind}")


def _choice(cfg: DictConfig, path: str, accepted) -> None:
    v = _number(cfg, path)
    _check(v in accepted, path, v, ", ".join(map(str, accepted)))


def validate(cfg: DictConfig) -> None:
    """Check the fields a user sets; raises ``UserError`` on the first bad one."""
    name = _number(cfg, "name")
    _check(
        isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+,-]*", name) is not None and ".." not in name,
        "name",
        name,
        "letters, digits and . _ = + , - (no path separators or '..': run folders stay under outputs/)",
    )
    _choice(cfg, "model.kind", KINDS)
    _choice(cfg, "model.likelihood", LIKELIHOODS)
    _choice(cfg, "model.encoder_std.mode", STD_MODES)
    _positive(cfg, "model.latent_dim", integer=True)
    hidden = _number(cfg, "model.hidden")
    _check(
        OmegaConf.is_list(hidden) and len(hidden) > 0 and all(_is_int(h) and h > 0 for h in hidden),
        "model.hidden",
        hidden,
        "a non-empty list of positive integers",
    )
    if cfg.model.kind == "lipschitz":
        for net in ("encoder_mean", "encoder_std", "decoder"):
            _positive(cfg, f"model.lipschitz.{net}")
        _check(
            all(h % 2 == 0 for h in hidden),
            "model.hidden",
            list(hidden),
            "even widths (GroupSort groups of 2)",
        )
        _choice(cfg, "model.layer", LAYERS)
        _positive(cfg, "model.bjorck.iters", integer=True)
        proj = _number(cfg, "model.bjorck.project_iters")
        _check(isinstance(proj, int) and proj >= 0, "model.bjorck.project_iters", proj, "an integer >= 0")
        b = _number(cfg, "model.bjorck.beta")
        _check(_is_num(b) and 0 < b <= 0.5, "model.bjorck.beta", b, "a number in (0, 0.5]")
    mode = cfg.model.encoder_std.mode
    if mode == "fixed":
        _positive(cfg, "model.encoder_std.gamma")
    if mode == "bounded":
        _positive(cfg, "model.encoder_std.max_norm")
    beta = _number(cfg, "model.beta")
    _check(_is_num(beta) and beta >= 0, "model.beta", beta, "a number >= 0")
    _positive(cfg, "model.lr")
    if cfg.model.likelihood == "gaussian":
        _positive(cfg, "model.obs_std")
    if cfg.data.get("_target_", IMAGE_DATA) == IMAGE_DATA:  # another class checks its own arguments
        _validate_image_data(cfg)
    _positive(cfg, "trainer.max_epochs", integer=True)
    _positive(cfg, "trainer.patience", integer=True)
    _validate_devices(cfg)
    _choice(cfg, "trainer.evaluate", ("best", "last"))
    mt = _number(cfg, "trainer.max_time")
    _check(mt is None or (_is_num(mt) and 0 < mt < math.inf), "trainer.max_time", mt, "minutes > 0, or null")
    seed = _number(cfg, "seed")
    _check(_is_int(seed) and 0 <= seed < 2**32, "seed", seed,
           "an integer in [0, 2^32)")
    _check(cfg.resume in (True, False, "auto"), "resume", cfg.resume, "true, false, auto")
    _positive(cfg, "data.eval_batch_size", integer=True)
    k = _number(cfg, "trainer.num_importance")
    _check(_is_int(k) and k >= 0, "trainer.num_importance", k,
           "an integer >= 0 (0 skips the log-likelihood)")
    _choice(cfg, "trainer.precision", ("32-true", "32", 32, "64-true", "64", 64))
    _validate_accelerator(cfg)
    if cfg.logger.wandb.enabled:
        _choice(cfg, "logger.wandb.mode", ("offline", "online", "disabled"))
    _validate_certify(cfg)
    _validate_attack(cfg)
    ft = _number(cfg, "trainer.finetune.max_epochs")
    _check(isinstance(ft, int) and ft >= 0, "trainer.finetune.max_epochs", ft, "an integer >= 0")


IMAGE_DATA = "lipvae.data.ImageDataModule"


def _validate_image_data(cfg: DictConfig) -> None:
    _choice(cfg, "data.name", tuple(DATASETS))
    limit = _number(cfg, "data.limit")
    _check(limit is None or (isinstance(limit, int) and limit > 0), "data.limit", limit, "a positive integer or null")
    _choice(cfg, "data.resplit", (True, False, "auto"))
    check_root(_number(cfg, "data.root"))
    _positive(cfg, "data.batch_size", integer=True)
    for field in ("data.val_fraction", "data.resplit_test_fraction"):
        v = _number(cfg, field)
        _check(_is_num(v) and 0 < v < 1, field, v, "a number in (0, 1)")


def _validate_accelerator(cfg: DictConfig) -> None:
    accelerator = _number(cfg, "trainer.accelerator")
    _choice(cfg, "trainer.accelerator", ("auto", "cpu", "gpu", "cuda", "mps"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator: got {accelerator!r}, but no CUDA device is visible; accepted: auto, cpu")
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "mps" and not (mps is not None and mps.is_available()):
        raise UserError("trainer.accelerator: got 'mps', but MPS is not available here; accepted: auto, cpu")


def _validate_devices(cfg: DictConfig) -> None:
    devices = _number(cfg, "trainer.devices")
    _check(devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1)),
           "trainer.devices", devices, "a positive integer, -1 or auto")
    if devices in (1, "auto") or _number(cfg, "trainer.strategy") != "auto":
        return
    accelerator = _number(cfg, "trainer.accelerator")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise UserError(
            f"trainer.devices: got {devices} on CPU; accepted: 1, or several with a strategy named"
            " (trainer.strategy=ddp; each process then trains on a share of the batches)"
        )


def _validate_certify(cfg: DictConfig) -> None:
    if not cfg.certify.enabled:
        return
    for field, ok, accepted in (
        ("certify.r", lambda v: _is_num(v) and v > 0, "a list of numbers > 0"),
        ("certify.p", lambda v: _is_num(v) and 0 < v < 1, "a list of numbers in (0, 1)"),
        ("certify.forms", lambda v: v in FORMS, f"a list drawn from {', '.join(FORMS)}"),
    ):
        values = _number(cfg, field)
        _check(OmegaConf.is_list(values) and len(values) > 0 and all(map(ok, values)), field, values, accepted)
    n = _number(cfg, "certify.num_inputs")
    _check(n is None or (isinstance(n, int) and n > 0), "certify.num_inputs", n, "a positive integer or null")
    if cfg.model.kind == "lipschitz":
        m = cfg.model.latent_dim
        _check(m >= 2, "model.latent_dim", m, "an integer >= 2 when certifying (the χ² bound; or certify.enabled=false)")


def _validate_attack(cfg: DictConfig) -> None:
    if not cfg.attack.enabled:
        return
    certified, attacked = _number(cfg, "certify.num_inputs"), _number(cfg, "attack.num_inputs")
    if cfg.certify.enabled and cfg.model.kind == "lipschitz" and _is_int(certified) and _is_int(attacked):
        _check(certified >= attacked, "certify.num_inputs", certified,
               f"null, or at least attack.num_inputs={attacked} (each attacked input's certificate is checked)")
    for field in ("attack.num_inputs", "attack.samples", "attack.starts", "attack.steps", "attack.latent.num_inputs"):
        _positive(cfg, field, integer=True)
    for field in ("attack.r", "attack.max_radius", "attack.tol", "attack.grid_step"):
        _positive(cfg, field)
    p = _number(cfg, "attack.p")
    _check(_is_num(p) and 0 < p < 1, "attack.p", p, "a number in (0, 1)")
    _choice(cfg, "attack.search", ("bisection", "grid"))
    _choice(cfg, "attack.method", METHODS)
    if cfg.attack.method == "lbfgs":
        for field in ("maxcor", "maxiter"):
            _positive(cfg, f"attack.lbfgs.{field}", integer=True)
        for field in ("factr", "pgtol"):
            _positive(cfg, f"attack.lbfgs.{field}")
    _choice(cfg, "attack.latent.kind", LATENT_KINDS)
    _positive(cfg, "attack.latent.steps", integer=True)
    if cfg.attack.latent.kind == "hard":
        budget = _number(cfg, "attack.latent.budget")
        _check(_is_num(budget) and budget >= 0, "attack.latent.budget", budget, "a number >= 0")
    else:
        penalty = _number(cfg, "attack.latent.penalty")
        _check(_is_num(penalty) and 0 <= penalty < math.inf, "attack.latent.penalty", penalty, "a number >= 0")
        _positive(cfg, "attack.latent.lr")


def build_vae(model: DictConfig) -> VAE:
    lip = model.lipschitz
    return VAE(
        kind=model.kind,
        latent_dim=model.latent_dim,
        hidden=tuple(model.hidden),
        encoder_mean_L=float(lip.encoder_mean),
        encoder_std_L=float(lip.encoder_std),
        decoder_L=float(lip.decoder),
        std_mode=model.encoder_std.mode,
        gamma=model.encoder_std.gamma,
        max_norm=model.encoder_std.max_norm,
        likelihood=model.likelihood,
        obs_std=model.obs_std,
        beta=float(model.beta),
        bjorck_iters=model.bjorck.iters,
        bjorck_beta=model.bjorck.beta,
        layer=model.layer,
    )


def build_datamodule(data: DictConfig, seed: int) -> ImageDataModule:
    """The data module of the ``data`` group, built from its ``_target_`` (``ImageDataModule``
    for runs recorded before the field existed) with the run's seed."""
    from hydra.utils import instantiate

    if "_target_" not in data:
        data = OmegaConf.merge({"_target_": IMAGE_DATA}, data)
    try:
        return instantiate(data, seed=seed, _convert_="all")
    except Exception as e:
        if isinstance(e.__cause__, UserError):  # the class's own one-line check
            raise e.__cause__ from None
        raise _cannot_build("data", data._target_, e) from None


#: Hydra flags that take no value; with any other flag the command line is left to Hydra.
_PLAIN_FLAGS = ("-m", "--multirun")


def check_overrides(argv: list[str], config_module: str = "lipvae.conf", config_name: str = "config") -> None:
    """Compose the command line's overrides once, before Hydra starts, and turn what Hydra would
    report in several lines (a mistyped key, an unknown choice of a config group, an override it
    cannot parse) into one ``UserError`` naming the field, what was given and what is accepted.
    A sweep (``a=1,2,3``) is checked at its first value; ``hydra`` settings are left to Hydra."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if any(a.startswith("-") and a not in _PLAIN_FLAGS for a in argv):
        return
    texts = [a for a in argv if a not in _PLAIN_FLAGS]
    parser = OverridesParser.create()
    overrides = []
    for text in texts:
        try:
            (o,) = parser.parse_overrides([text])
        except OverrideParseException as e:
            why = str(e).splitlines()[0]
            raise UserError(f"{text}: cannot be read as an override ({why}); write key=value") from None
        if o.key_or_group.split(".")[0].split("/")[0] == "hydra":
            continue
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_string_iterator()))
            except Exception:  # a range or interval sweep: no first value to try here
                continue
            overrides.append(f"{o.get_key_element()}={first}")
        else:
            overrides.append(text)

    def composed(items: list[str]) -> DictConfig:
        with initialize_config_module(version_base="1.3", config_module=config_module):
            return compose(config_name=config_name, overrides=items)

    try:
        composed(overrides)
    except MissingConfigException as e:
        message = str(e)
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
        options = re.findall(r"^\t(\S+)$", message.split("Config search path")[0], flags=re.M)
        if found is None:
            raise UserError(message.splitlines()[0]) from None
        group, choice = found.groups()
        raise UserError(f"{group}: got {choice!r}; accepted: {', '.join(options)}") from None
    except ConfigCompositionException as e:
        found = re.search(r"Could not override '([^']+)'", str(e))
        if found is None:
            raise UserError(str(e).splitlines()[0]) from None
        key = found.group(1)
        rest = [o for o in overrides if o.split("=", 1)[0] != key]
        try:
            keys = field_paths(composed(rest))
        except Exception:
            keys = []
        raise UserError(f"{no_such_field(key, keys)} (to add a new field, write +{key}=...)") from None


def field_paths(cfg, prefix: str = "") -> list[str]:
    """Every dotted path of a config, the inner nodes' included."""
    keys = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, DictConfig):
            keys.extend(field_paths(v, path + "."))
    return keys


def no_such_field(key: str, keys: list[str]) -> str:
    """``<key>: no such field; did you mean <closest>?``: the closest is looked for among the
    fields beside ``key`` when its parent exists (so a shared prefix does not count), else
    among all paths."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    if parent and parent in keys:
        siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
        close = [f"{parent}.{c}" for c in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
    else:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"{key}: no such field; " + (f"did you mean {close[0]}?" if close else "no field of that name")


def _cannot_build(field: str, target: str, error: Exception) -> UserError:
    """One line for a ``_target_`` that Hydra could not instantiate, naming the cause."""
    cause = error.__cause__ or error
    first = str(cause).splitlines()[0] if str(cause) else ""
    return UserError(f"{field}: cannot build {target} ({type(cause).__name__}: {first})")


def build_callbacks(cfg: DictConfig) -> list:
    """The extra Lightning callbacks of the ``callbacks`` group, each built from its ``_target_``;
    one line naming the entry when one cannot be built."""
    from lightning.pytorch.callbacks import Callback

    return _build_entries(cfg, "callbacks", Callback, "a lightning.pytorch Callback class")


def build_extra_loggers(cfg: DictConfig, save_dir) -> list:
    """The loggers of ``logger.extra`` (beside the CSV and W&B ones), each built from its
    ``_target_``; ``save_dir`` is the run folder unless the entry names one."""
    from lightning.pytorch.loggers import Logger

    return _build_entries(cfg, "logger.extra", Logger, "a lightning.pytorch Logger class",
                          defaults={"save_dir": str(save_dir)})


def _build_entries(cfg: DictConfig, path: str, base: type, accepted: str, defaults: dict | None = None) -> list:
    from hydra.utils import get_class, instantiate

    entries = _number(cfg, path)
    if entries is None:
        return []
    _check(OmegaConf.is_dict(entries), path, entries, "a mapping of names to {_target_: ..., arguments}")
    built = []
    for name, spec in entries.items():
        field = f"{path}.{name}"
        _check(OmegaConf.is_dict(spec) and "_target_" in spec, field, spec,
               f"a mapping with _target_ ({accepted}) and its arguments")
        try:
            cls = get_class(spec._target_)
            extra = {k: v for k, v in (defaults or {}).items() if k not in spec and _accepts(cls, k)}
            obj = instantiate(spec, **extra)
        except Exception as e:  # a wrong class path or argument
            raise _cannot_build(field, spec._target_, e) from None
        _check(isinstance(obj, base), field, spec._target_, accepted)
        built.append(obj)
    return built


def _accepts(cls: type, argument: str) -> bool:
    import inspect

    try:
        return argument in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
