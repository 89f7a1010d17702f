"""The typed schema of every config group: the one place a field's type and constraint live.

Each group's YAML files (``conf/<group>/*.yaml``) extend their schema, registered below in
Hydra's ConfigStore as ``schema/<group>``; the YAML holds the defaults and their comments.
Composition checks the types (``seed=abc`` fails there); :func:`check_fields` then checks each
field's constraint (``metadata["ok"]``), and ``lipvae.config.validate`` the few rules that tie
fields together. All become the one-line ``<field>: got <value>; accepted: <...>`` of
:class:`~lipvae.errors.UserError`. The ``attack`` node's schema follows its ``_target_``
(``attack_schema``): L-BFGS-B's has none of pgd's fields.
"""

import dataclasses
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, List, Optional, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from lipvae.certify.bounds import CERTIFY_FORMS, STD_MODES
from lipvae.catalog import DATASETS
from lipvae.errors import UserError


# Choices. Each member's value is its name (StrEnum's functional form), so `model.kind=lipschitz`
# sets Kind.lipschitz, which also compares equal to the string "lipschitz".
Kind = StrEnum("Kind", "lipschitz standard")
Likelihood = StrEnum("Likelihood", "continuous_bernoulli bernoulli gaussian")
StdMode = StrEnum("StdMode", {m: m for m in STD_MODES})  # the bounds' modes: one list of them
Accelerator = StrEnum("Accelerator", "auto cpu gpu cuda mps")
Weights = StrEnum("Weights", "best last")
Search = StrEnum("Search", "bisection grid")
LatentKind = StrEnum("LatentKind", "hard soft")
WandbMode = StrEnum("WandbMode", "offline online disabled")


# ---- constraints: a predicate on the value and the words for what it accepts -------------


def _num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE = (lambda v: _num(v) and 0 < v < math.inf, "a positive number")
POSITIVE_INT = (lambda v: _int(v) and v > 0, "a positive integer")
NONNEG_INT = (lambda v: _int(v) and v >= 0, "an integer >= 0")
NONNEG = (lambda v: _num(v) and 0 <= v < math.inf, "a number >= 0")
UNIT = (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)")
TRI_STATE = (lambda v: v in (True, False, "auto"), "true, false, auto")


def spec(ok_accepted=None, default=MISSING, *, when: Callable[[DictConfig], bool] | None = None,
         factory=None):
    """A schema field with a constraint: ``ok_accepted = (predicate, words)``; ``when(root)``
    says whether it applies (e.g. γ only with a fixed σ)."""
    ok, accepted = ok_accepted if ok_accepted else (None, None)
    meta = {"ok": ok, "accepted": accepted, "when": when}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _lipschitz(root) -> bool:
    return root.model.kind == Kind.lipschitz


# ---- the groups ---------------------------------------------------------------------------


@dataclass
class EncoderStdConfig:
    mode: StdMode = MISSING
    gamma: Optional[float] = spec(POSITIVE, None, when=lambda root: root.model.encoder_std.mode == StdMode.fixed)
    max_norm: Optional[float] = spec(POSITIVE, None, when=lambda root: root.model.encoder_std.mode == StdMode.bounded)


@dataclass
class LipschitzConstants:
    encoder_mean: float = spec(POSITIVE, when=_lipschitz)
    encoder_std: float = spec(POSITIVE, when=_lipschitz)
    decoder: float = spec(POSITIVE, when=_lipschitz)


Arch = StrEnum("Arch", "mlp conv")


@dataclass
class ArchConfig:
    """``model.arch`` (the ``model/arch`` group): fully connected (``hidden`` widths) or
    convolutional networks (``lipvae.conv``: a stage per entry of ``channels``, each halving the
    resolution)."""

    kind: Arch = MISSING
    channels: List[int] = spec((lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0
                                and all(_int(c) and c > 0 and c % 2 == 0 for c in v),
                                "a non-empty list of positive even integers (GroupSort pairs)"),
                               when=lambda root: root.model.arch.kind == Arch.conv, factory=lambda: [32, 64])
    kernel_size: int = spec((lambda v: _int(v) and v > 0 and v % 2 == 1, "a positive odd integer"), 3,
                            when=lambda root: root.model.arch.kind == Arch.conv)


@dataclass
class ModelConfig:
    """``model``: the VAE, built from exactly these fields (``VAE.from_config``'s arguments); its
    ``layer`` node is the ``model/layer`` group's partial, checked by building it."""

    _target_: str = MISSING  # the class (or factory) that builds the model from these fields
    kind: Kind = MISSING
    latent_dim: int = spec(POSITIVE_INT)
    hidden: List[int] = spec((lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0
                              and all(_int(h) and h > 0 for h in v), "a non-empty list of positive integers"))
    beta: float = spec(NONNEG)
    likelihood: Likelihood = MISSING
    obs_std: float = spec(POSITIVE, when=lambda root: root.model.likelihood == Likelihood.gaussian)
    encoder_std: EncoderStdConfig = MISSING
    lipschitz: LipschitzConstants = MISSING
    layer: Any = MISSING
    arch: ArchConfig = field(default_factory=lambda: ArchConfig(kind=Arch.mlp))


@dataclass
class ModuleConfig:
    """``module``: the LightningModule's settings (``lipvae.module.VAEModule``, given the VAE)."""

    _target_: str = MISSING
    lr: float = spec(POSITIVE)
    num_importance: int = spec((NONNEG_INT[0], "an integer >= 0 (0 skips the log-likelihood)"))
    retract_every: int = spec(POSITIVE_INT, 1)
    tangent_projection: bool = True


@dataclass
class EarlyStoppingConfig:
    """``callbacks.early_stopping``: Lightning's EarlyStopping (phase 1)."""

    _target_: str = MISSING
    monitor: str = MISSING
    mode: str = spec((lambda v: v in ("min", "max"), "min, max"))
    patience: int = spec(POSITIVE_INT)
    min_delta: float = spec(NONNEG, 0.0)
    check_on_train_epoch_end: bool = False


@dataclass
class FinetuneConfig:
    """``callbacks.finetune``: ``lipvae.module.FineTune`` (phase 2)."""

    _target_: str = MISSING
    max_epochs: int = spec(NONNEG_INT)
    bjorck_iters: int = spec(POSITIVE_INT)
    lr: float = spec(POSITIVE)
    tol: float = spec(NONNEG)
    patience: int = spec(POSITIVE_INT)


PRECISIONS = ("32-true", "32", "64-true", "64")


def _strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ["auto", *StrategyRegistry.available_strategies()]


@dataclass
class TrainerConfig:
    """``trainer``: Lightning's Trainer, built from these fields (``max_time`` in minutes); the run
    adds its folder, loggers, callbacks and checkpoint writer."""

    _target_: str = MISSING
    accelerator: Accelerator = MISSING
    devices: Any = spec((lambda v: v == "auto" or (_int(v) and (v >= 1 or v == -1)), "a positive integer, -1 or auto"))
    strategy: str = spec((lambda v: v in _strategies(), "auto or a Lightning strategy name (ddp, ddp_spawn, fsdp, ...)"))
    precision: str = spec((lambda v: v in PRECISIONS, ", ".join(PRECISIONS)))
    max_epochs: int = spec(POSITIVE_INT)
    max_time: Optional[float] = spec((lambda v: v is None or (_num(v) and 0 < v < math.inf), "minutes > 0, or null"), None)
    log_every_n_steps: int = spec(POSITIVE_INT)
    enable_progress_bar: bool = MISSING
    num_sanity_val_steps: int = spec((lambda v: _int(v) and v >= -1, "an integer >= -1"), 0)


#: an explicit data.root is an existing folder: never a silent fallback elsewhere
ROOT = (lambda v: v is None or Path(str(v)).expanduser().is_dir(),
        "an existing folder holding the IDX files, or null to search")


@dataclass
class ImageDataConfig:
    """The schema of ``lipvae.data.ImageDataModule``'s arguments (another ``_target_`` brings
    its own config, unchecked here)."""

    _target_: str = "lipvae.data.ImageDataModule"
    name: str = spec((lambda v: v in DATASETS, ", ".join(DATASETS)))
    root: Optional[str] = spec(ROOT, None)
    batch_size: int = spec(POSITIVE_INT)
    eval_batch_size: int = spec(POSITIVE_INT)
    val_fraction: float = spec(UNIT)
    resplit: Any = spec((TRI_STATE[0], "True, False, auto"))
    resplit_test_fraction: float = spec(UNIT)
    limit: Optional[int] = spec((lambda v: v is None or (_int(v) and v > 0), "a positive integer or null"), None)
    download: bool = True


def _list_of(ok, words):
    return (lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(map(ok, v)), words)


def _certifying(root) -> bool:
    return bool(root.margins.certify)


def _coupled(root) -> bool:
    return _certifying(root) and "coupled" in root.certify.forms


@dataclass
class CoupledConfig:
    samples: int = spec((lambda v: _int(v) and v >= 100, "an integer >= 100"), when=_coupled)
    alpha: float = spec((lambda v: _num(v) and 0 < v <= 0.5, "a number in (0, 0.5]"), when=_coupled)
    seed: int = spec(NONNEG_INT, when=_coupled)


@dataclass
class CertifyConfig:
    """``certify``: the arguments of its ``_target_`` (``lipvae.certify.certificates.Certifier``)."""

    _target_: str = MISSING
    r: List[float] = spec(_list_of(POSITIVE[0], "a list of numbers > 0"), when=_certifying)
    p: List[float] = spec(_list_of(UNIT[0], "a list of numbers in (0, 1)"), when=_certifying)
    forms: List[str] = spec(_list_of(lambda v: v in CERTIFY_FORMS, f"a list drawn from {', '.join(CERTIFY_FORMS)}"),
                            when=_certifying)
    coupled: CoupledConfig = field(default_factory=CoupledConfig)


def _attacking(root) -> bool:
    return bool(root.margins.attack)


@dataclass
class LbfgsConfig:
    maxcor: int = spec(POSITIVE_INT, when=_attacking)
    factr: float = spec(POSITIVE, when=_attacking)
    pgtol: float = spec(POSITIVE, when=_attacking)
    maxiter: int = spec(POSITIVE_INT, when=_attacking)


@dataclass
class LatentAttackConfig:
    kind: LatentKind = MISSING
    budget: Optional[float] = spec(NONNEG, None, when=lambda root: _attacking(root) and root.margins.latent.kind == "hard")
    penalty: Optional[float] = spec(NONNEG, None, when=lambda root: _attacking(root) and root.margins.latent.kind == "soft")
    lr: Optional[float] = spec(POSITIVE, None, when=lambda root: _attacking(root) and root.margins.latent.kind == "soft")
    num_inputs: int = spec(POSITIVE_INT, when=_attacking)
    steps: int = spec(POSITIVE_INT, when=_attacking)


@dataclass
class MarginsConfig:
    """``margins``: which margins an evaluation computes and on which test inputs (the ``certify``
    and ``attack`` groups are the objects that compute them), and the latent-space attack."""

    certify: bool = MISSING
    certified_inputs: Optional[int] = spec((lambda v: v is None or (_int(v) and v > 0), "a positive integer or null"),
                                           None, when=_certifying)
    attack: bool = MISSING
    attacked_inputs: int = spec(POSITIVE_INT, when=_attacking)
    latent: LatentAttackConfig = MISSING


@dataclass
class AttackConfig:
    """What every margin attack takes (``attack/<option>.yaml``): arguments of its class."""

    _target_: str = MISSING  # a lipvae.attack.MarginAttack subclass, given every field
    r: float = spec(POSITIVE, when=_attacking)
    p: float = spec(UNIT, when=_attacking)
    samples: int = spec(POSITIVE_INT, when=_attacking)
    starts: int = spec(POSITIVE_INT, when=_attacking)
    max_radius: float = spec((lambda v: _num(v) and 0 < v <= 1e6, "a positive number up to 1e6 (a radius in input"
                                                                  " space; float32 cannot hold much larger ones)"),
                             when=_attacking)
    grid_step: float = spec(POSITIVE, when=_attacking)
    pixel_range: bool = MISSING


@dataclass
class PgdAttackConfig(AttackConfig):
    """``attack=pgd`` (and options built on it): lipvae's batched attack."""

    steps: int = spec(POSITIVE_INT, when=_attacking)
    tol: float = spec(POSITIVE, when=_attacking)
    search: Search = MISSING
    compile: bool = False
    warm_steps: int = spec(NONNEG_INT, 0, when=_attacking)


@dataclass
class LbfgsAttackConfig(AttackConfig):
    """``attack=lbfgs``: the reference procedure, a grid search with SciPy's L-BFGS-B; it has no
    projected-gradient steps, bisection tolerance or warm starts, so it has none of those fields."""

    lbfgs: LbfgsConfig = field(default_factory=LbfgsConfig)


@dataclass
class WandbConfig:
    """``logger.wandb``: Lightning's WandbLogger (``mode`` goes on to ``wandb.init``)."""

    _target_: str = MISSING
    mode: WandbMode = MISSING
    project: str = MISSING
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


NAME = (lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+,-]*", v) is not None and ".." not in v
        and len(v) <= 200,
        "letters, digits and . _ = + , -, at most 200 (no path separators or '..': run folders stay under outputs/)")


#: what ``objective`` may name: each a number of results.json (its part and key) that a run returns
#: to a sweeper; higher is better for each but test_kl and soundness_violations
OBJECTIVES = {
    "test_elbo": ("metrics", "test_elbo"),
    "test_log_likelihood": ("metrics", "test_log_likelihood"),
    "test_kl": ("metrics", "test_kl"),
    "certified_mean": ("certified", "mean"),
    "certified_median": ("certified", "median"),
    "certified_fraction": ("certified", "fraction_certified"),
    "global_margin": ("certified", "global_margin"),
    "estimated_mean": ("estimated", "mean"),
    "soundness_violations": ("soundness_violations",),
    # the certified mean margin of a model whose test log-likelihood reaches likelihood_floor,
    # -inf below it: "the largest certified margin at a minimum likelihood" as one number
    "certified_mean_above_floor": ("certified", "mean"),
}
OBJECTIVE = (lambda v: v in OBJECTIVES or (isinstance(v, (list, ListConfig)) and len(v) > 0
                                           and all(x in OBJECTIVES for x in v)),
             f"one of {', '.join(OBJECTIVES)}, or a list of them (a multi-objective sweep)")


@dataclass
class RootConfig:
    """Top-level fields; each group keeps its own schema (``data`` only for ImageDataModule)."""

    enc_L: float = spec(POSITIVE, when=_lipschitz)
    dec_L: float = spec(POSITIVE, when=_lipschitz)
    seed: int = spec((lambda v: _int(v) and 0 <= v < 2**32, "an integer in [0, 2^32)"))
    resume: Any = spec(TRI_STATE)
    name: str = spec(NAME)
    evaluate: Weights = MISSING
    objective: Any = spec(OBJECTIVE, "test_elbo")
    # a figure's wall-clock budget per model in minutes, by tier (tier/cpu.yaml and official.yaml read it)
    budget_minutes: Any = spec((lambda v: v is None or (isinstance(v, (dict, DictConfig)) and all(
        isinstance(k, str) and _num(m) and 0 < m < math.inf for k, m in v.items())),
        "a mapping of tier names to minutes > 0, or null"), None)
    likelihood_floor: Optional[float] = spec((lambda v: v is None or (_num(v) and math.isfinite(v)),
                                              "a number of nats, or null"), None)
    data: Any = MISSING
    module: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    callbacks: Any = None  # named entries, each a Lightning callback (a schema below for lipvae's own)
    logger: Any = None     # named entries, each a Lightning logger
    certify: Any = MISSING
    attack: Any = MISSING
    margins: Any = MISSING


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "module": ModuleConfig,
    "trainer": TrainerConfig,
    "data": ImageDataConfig,
    "certify": CertifyConfig,
    "attack": PgdAttackConfig,
    "margins": MarginsConfig,
}

#: the schemas of the named entries lipvae ships (checked where the entry is present; the
#: ``callbacks`` and ``logger`` nodes stay open to entries of the user's own)
ENTRIES: dict[str, type] = {
    "callbacks.early_stopping": EarlyStoppingConfig,
    "callbacks.finetune": FinetuneConfig,
    "logger.wandb": WandbConfig,
}

#: the schema of an ``attack`` node by its ``_target_``; an attack class of the user's has the
#: common fields' (``AttackConfig``) and its own arguments, which its constructor checks
ATTACK_SCHEMAS = {"lipvae.attack.PGDAttack": PgdAttackConfig, "lipvae.attack.LBFGSAttack": LbfgsAttackConfig}


def attack_schema(attack) -> type:
    target = attack.get("_target_") if attack is not None else None
    return PgdAttackConfig if target is None else ATTACK_SCHEMAS.get(target, AttackConfig)


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent): ``schema/<group>`` for the groups'
    YAML files, ``schema/root`` for config.yaml."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="root", node=RootConfig)
    for group, node in GROUPS.items():
        cs.store(group="schema", name=group, node=node)
    for path, node in ENTRIES.items():
        cs.store(group="schema", name=path.rpartition(".")[2], node=node)
    cs.store(group="schema", name="latent", node=LatentAttackConfig)
    cs.store(group="schema", name="attack_lbfgs", node=LbfgsAttackConfig)


register()


# ---- checking -------------------------------------------------------------------------------


def schema_field(path: str, root: type | None = None) -> dataclasses.Field | None:
    """The schema field of a dotted path (``model.encoder_std.gamma``) in ``root`` (the run
    config's schema unless given), or None."""
    parts = path.split(".")
    node: Any = root or RootConfig
    if node is RootConfig and ".".join(parts[:2]) in ENTRIES:
        node, parts = ENTRIES[".".join(parts[:2])], parts[2:]
    elif node is RootConfig and parts[0] in GROUPS:
        node, parts = GROUPS[parts[0]], parts[1:]
    found = None
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        found = fields.get(part)
        if found is None:
            return None
        node = _dataclass_of(found.type)
    return found


def _dataclass_of(annotation) -> type | None:
    """The schema class of a field's type (``Optional[X]`` included), or None."""
    for t in (annotation, *get_args(annotation)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def accepted_words(path: str, enum_values=None, root: type | None = None) -> str:
    """What a field accepts, in words: its constraint's, else its Enum's members, else its type."""
    f = schema_field(path, root)
    if f is not None and f.metadata.get("accepted"):
        return f.metadata["accepted"]
    if enum_values:
        return ", ".join(enum_values)
    kind = "" if f is None else str(f.type)
    for word, text in (("bool", "true or false"), ("int", "an integer"), ("float", "a number"), ("str", "a string")):
        if word in kind:
            return text
    return "a value of the field's type"


def read(cfg: DictConfig, path: str):
    """A field's value; an interpolation that cannot be resolved or converted is a ``UserError``
    naming the field and the value it got."""
    try:
        return OmegaConf.select(cfg, path, throw_on_missing=True)
    except Exception as e:
        value = getattr(e, "value", None)
        if value is not None and "could not be converted" in str(e):
            raise UserError(f"{path}: got {value!r}; accepted: {accepted_words(path)}") from None
        raise UserError(f"{path}: cannot be resolved ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None


def _plain(v):
    return OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v


def fail(path: str, value, accepted: str):
    raise UserError(f"{path}: got {_plain(value)!r}; accepted: {accepted}")


def check(ok: bool, path: str, value, accepted: str) -> None:
    """``fail`` unless ``ok``."""
    if not ok:
        fail(path, value, accepted)


def check_fields(root: DictConfig, prefix: str, schema: type) -> None:
    """Every constrained field of ``schema`` under ``prefix``, nested schemas included."""
    for f in dataclasses.fields(schema):
        path = f"{prefix}.{f.name}" if prefix else f.name
        when = f.metadata.get("when")
        if when is not None and not when(root):
            continue
        value = read(root, path)
        ok = f.metadata.get("ok")
        if ok is not None and not ok(value):
            fail(path, value, f.metadata["accepted"])
        nested = _dataclass_of(f.type)
        if nested is not None and value is not None:
            check_fields(root, path, nested)
