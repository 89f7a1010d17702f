"""From a checked config to objects: each group's ``_target_`` built with Hydra's ``instantiate``
(the VAE and its layer, the LightningModule, the Trainer, the data module, the attack, the
certifier, the callbacks and loggers); a ``_target_`` that cannot be built is one line naming the
field (``UserError``). The checks themselves are ``lipvae.config``'s."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lipvae.data import ImageDataModule
from lipvae.errors import UserError
from lipvae.schema import check as _check
from lipvae.vae import VAE

IMAGE_DATA = "lipvae.data.ImageDataModule"


def build_vae(model: DictConfig, input_shape) -> VAE:
    """The VAE of the ``model`` group for inputs of ``input_shape`` (the data's ``(C, H, W)``,
    or a stored model's): its ``_target_`` called with every field of the node, the layer being
    ``build_layer``'s partial (a standard VAE has none)."""
    from hydra.utils import instantiate

    layer = build_layer(model) if model.kind == "lipschitz" else None
    try:
        return instantiate(model, layer=layer, input_shape=tuple(int(s) for s in input_shape), _convert_="all")
    except Exception as e:
        if isinstance(e.__cause__, UserError):  # the architecture's own one-line check (lipvae.conv)
            raise e.__cause__ from None
        raise _cannot_build("model", model.get("_target_"), e) from None


def build_module(module: DictConfig, vae: VAE):
    """The LightningModule of the ``module`` group (``VAEModule``), holding ``vae``."""
    from hydra.utils import instantiate

    try:
        return instantiate(module, vae=vae)
    except Exception as e:
        raise _cannot_build("module", module.get("_target_"), e) from None


def build_trainer(trainer: DictConfig, run_dir, **run):
    """Lightning's Trainer of the ``trainer`` group; ``max_time`` is in minutes; ``run``: what the
    run adds (loggers, callbacks, plugins, or another ``devices`` after a multi-device fit)."""
    from datetime import timedelta

    from hydra.utils import instantiate

    minutes = trainer.max_time
    try:  # through a partial: the config's max_time is a number, the Trainer's a timedelta
        return instantiate(trainer, _partial_=True)(
            default_root_dir=str(run_dir), max_time=None if minutes is None else timedelta(minutes=minutes), **run)
    except Exception as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise _cannot_build("trainer", trainer.get("_target_"), e) from None


def target_class(field: str, target: str, base: type, accepted: str) -> type:
    """The class a ``_target_`` names, which must subclass ``base``: one line naming ``field``
    when it cannot be imported or is of another kind."""
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as e:
        raise _cannot_build(field, target, e) from None
    _check(isinstance(cls, type) and issubclass(cls, base), f"{field}._target_", target, accepted)
    return cls


def build_attack(attack: DictConfig):
    """The margin attack of the ``attack`` group: its ``_target_`` class (a
    ``lipvae.attack.MarginAttack``) built from the group's fields, each an argument of it."""
    from hydra.utils import instantiate

    from lipvae.attack import MarginAttack

    target = attack.get("_target_")
    target_class("attack", target, MarginAttack, "a subclass of lipvae.attack.MarginAttack")
    try:
        return instantiate(attack, _convert_="all")
    except Exception as e:
        raise _cannot_build("attack", target, e) from None


def build_certifier(certify: DictConfig):
    """The certifier of the ``certify`` group (``lipvae.certify.certificates.Certifier``)."""
    from hydra.utils import instantiate

    try:
        return instantiate(certify, _convert_="all")
    except Exception as e:
        raise _cannot_build("certify", certify.get("_target_"), e) from None


def build_layer(model: DictConfig):
    """The Lipschitz layer of the ``model/layer`` group: a partial of its ``_target_`` class
    (a ``lipvae.networks.LipschitzLinear``), called with (in, out, scale=...) for each layer."""
    from hydra.utils import instantiate

    from lipvae.networks import LipschitzLinear

    spec = model.layer
    _check(OmegaConf.is_dict(spec) and "_target_" in spec, "model.layer", spec,
           "a mapping with _target_ (a LipschitzLinear class) and its arguments: model/layer=<a file of conf/model/layer/>")
    target_class("model.layer", spec._target_, LipschitzLinear, "a subclass of lipvae.networks.LipschitzLinear")
    try:
        layer = instantiate(spec, _partial_=True)
        layer(2, 2, scale=1.0)  # a tiny one: its arguments are checked now, not when the VAE is built
    except Exception as e:
        raise _cannot_build("model.layer", spec._target_, e) from None
    return layer


def build_datamodule(data: DictConfig, seed: int) -> ImageDataModule:
    """The data module of the ``data`` group, built from its ``_target_`` (``ImageDataModule``
    for runs recorded before the field existed) with the run's seed."""
    from hydra.utils import instantiate

    if "_target_" not in data:
        data = OmegaConf.merge({"_target_": IMAGE_DATA}, data)
    data = _declared_data_fields(data)
    try:
        return instantiate(data, seed=seed, _convert_="all")
    except Exception as e:
        if isinstance(e.__cause__, UserError):  # the class's own one-line check
            raise e.__cause__ from None
        raise _cannot_build("data", data._target_, e) from None


def _declared_data_fields(data: DictConfig) -> DictConfig:
    """``data`` less the fields that presets set on lipvae's own data modules (``limit``,
    ``eval_batch_size``, ...: ``ImageData``'s) where the ``_target_`` does not declare them:
    a preset never hands a data module of the user's an argument it does not take. Any other
    field the class does not take stays, and its build names it."""
    import inspect

    from lipvae.schema import ImageDataConfig

    if data._target_ == IMAGE_DATA:
        return data
    try:
        params = inspect.signature(target_class("data", data._target_, object, "a LightningDataModule")).parameters
    except (TypeError, ValueError):
        return data
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return data
    preset = set(ImageDataConfig.model_fields) - {"target"}
    dropped = [k for k in data if k in preset and k not in params]
    if not dropped:
        return data
    import logging

    logging.getLogger("lipvae").info("data: %s not argument(s) of %s; left out", ", ".join(dropped), data._target_)
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(data, resolve=True).items() if k not in dropped})


def _cannot_build(field: str, target: str, error: Exception) -> UserError:
    """One line for a ``_target_`` that Hydra could not instantiate, naming the cause."""
    cause = error.__cause__ or error
    first = str(cause).splitlines()[0] if str(cause) else ""
    return UserError(f"{field}: cannot build {target} ({type(cause).__name__}: {first})")


def _entry_kinds() -> dict[str, tuple[type, str]]:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    return {"callbacks": (Callback, "a lightning.pytorch Callback class"),
            "logger": (Logger, "a lightning.pytorch Logger class")}


def _entries(cfg: DictConfig, path: str) -> dict:
    """The named entries of ``callbacks`` or ``logger`` (an entry set to null is left out)."""
    entries = OmegaConf.select(cfg, path)  # resolvable: checked by validate
    if entries is None:
        return {}
    _check(OmegaConf.is_dict(entries), path, entries, "a mapping of names to {_target_: ..., arguments}")
    accepted = _entry_kinds()[path][1]
    out = {}
    for name, spec in entries.items():
        if spec is None:
            continue
        _check(OmegaConf.is_dict(spec) and "_target_" in spec, f"{path}.{name}", spec,
               f"a mapping with _target_ ({accepted}) and its arguments")
        out[f"{path}.{name}"] = spec
    return out


def build_entries(cfg: DictConfig, path: str, run: dict | None = None) -> list:
    """The Lightning callbacks (``path="callbacks"``) or loggers (``"logger"``) of a run, each
    entry built from its ``_target_`` and its fields; ``run(cls, spec)``: what the run adds to an
    entry of that class (a logger's folder). One line naming the entry when one cannot be built."""
    from hydra.utils import instantiate

    base, accepted = _entry_kinds()[path]
    built = []
    for field, spec in _entries(cfg, path).items():
        cls = target_class(field, spec._target_, base, accepted)
        extra = run(cls, spec) if run else {}  # what the run adds (its own one-line errors)
        try:
            obj = instantiate(spec, _partial_=True)(**extra)  # `config` may be an argument
        except Exception as e:  # a wrong argument
            raise _cannot_build(field, spec._target_, e) from None
        built.append(obj)
    return built
