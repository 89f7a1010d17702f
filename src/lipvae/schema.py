"""The config's schema: a pydantic model per group, the one place a field's type, constraint and
the words for what it accepts live (the YAML files in ``conf/`` hold the defaults). Pydantic, not
Hydra's structured configs, which type fields but leave every constraint to code of one's own.
``check_node`` turns the first refused field into ``<field>: got <value>; accepted: <words>``."""

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from lipvae.catalog import DATASETS
from lipvae.certify.bounds import CERTIFY_FORMS, STD_MODES
from lipvae.errors import UserError
from lipvae.results import OBJECTIVES


def accepts(words: str, kind: Any = Any, check=None, **constraints) -> Any:
    """``kind`` with pydantic's ``constraints`` and, after them, ``check(value)``; whatever it
    refuses is reported as accepting ``words``."""
    def refuse(value, handler):
        try:
            value = handler(value)
            ok = check is None or check(value)
        except (ValidationError, TypeError, ValueError):
            ok = False
        if not ok:
            raise PydanticCustomError("accepted", words)
        return value

    return Annotated[kind, Field(**constraints), WrapValidator(refuse)]


def one_of(*choices: str) -> Any:
    return accepts(", ".join(choices), Literal[choices])


def real(words: str, **constraints) -> Any:
    """A finite number (an integer is one; true/false are not)."""
    return accepts(words, float, strict=True, allow_inf_nan=False, **constraints)


def listed(words: str, item: Any) -> Any:
    return accepts(words, list[item], min_length=1)


Positive = real("a positive number", gt=0)
Nonneg = real("a number >= 0", ge=0)
Unit = real("a number in (0, 1)", gt=0, lt=1)
PositiveInt = accepts("a positive integer", StrictInt, gt=0)
NonnegInt = accepts("an integer >= 0", StrictInt, ge=0)
PositiveOrNull = accepts("a positive integer or null", Optional[StrictInt], check=lambda v: v is None or v > 0)
Bool = accepts("true or false", StrictBool)


TriState = accepts("true, false, auto", check=lambda v: v is True or v is False or v == "auto")
PRECISIONS = ("32-true", "32", "64-true", "64")


def _strategies() -> list[str]:
    """Lightning's strategies but those that start the devices' processes by spawn or fork: the
    run's record is read from the state training leaves in this process, which they keep apart."""
    from lightning.pytorch.strategies import StrategyRegistry as S

    return ["auto", *(n for n in S.available_strategies() if S[n]["init_params"].get("start_method") not in ("spawn", "fork"))]


class Closed(BaseModel):
    """A node whose fields are exactly these: another key would be ignored, so it is refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)


class Built(Closed):
    target: str = Field(alias="_target_")  # the class (or factory) built from the node's fields


class EncoderStdConfig(Closed):
    mode: one_of(*STD_MODES)
    gamma: Optional[Positive] = None     # required with mode=fixed (lipvae.config.validate)
    max_norm: Optional[Positive] = None  # required with mode=bounded


class LipschitzConstants(Closed):
    encoder_mean: Positive
    encoder_std: Positive
    decoder: Positive


class ArchConfig(Closed):  # fully connected (model.hidden) or convolutional (lipvae.conv)
    kind: one_of("mlp", "conv")
    channels: Optional[listed("a non-empty list of positive even integers (GroupSort pairs)",
                              accepts("", StrictInt, check=lambda c: c > 0 and c % 2 == 0))] = None  # conv's
    kernel_size: Optional[accepts("a positive odd integer", StrictInt, check=lambda k: k > 0 and k % 2 == 1)] = None


class ModelConfig(Built):  # the VAE's arguments; layer: the model/layer group's, checked by building it
    kind: one_of("lipschitz", "standard")
    latent_dim: PositiveInt
    hidden: listed("a non-empty list of positive integers", accepts("", StrictInt, gt=0))
    beta: Nonneg
    likelihood: one_of("continuous_bernoulli", "bernoulli", "gaussian")
    obs_std: Positive
    encoder_std: EncoderStdConfig
    lipschitz: LipschitzConstants
    layer: Any
    arch: ArchConfig


class ModuleConfig(Built):
    lr: Positive
    num_importance: accepts("an integer >= 0 (0 skips the log-likelihood)", StrictInt, ge=0)
    retract_every: PositiveInt
    tangent_projection: Bool


class EarlyStoppingConfig(Built):
    monitor: str
    mode: one_of("min", "max")
    patience: PositiveInt
    min_delta: Nonneg = 0.0
    check_on_train_epoch_end: Bool = False


class FineTuneConfig(Built):
    max_epochs: NonnegInt
    bjorck_iters: PositiveInt
    lr: Positive
    tol: Nonneg
    patience: PositiveInt


class TrainerConfig(Built):  # max_time in minutes
    accelerator: one_of("auto", "cpu", "gpu", "cuda", "mps")
    devices: accepts("a positive integer, -1 or auto", check=lambda v: v == "auto" or (
        type(v) is int and (v >= 1 or v == -1)))
    strategy: accepts("auto or a Lightning strategy name that runs this command on every device (ddp, fsdp, ...;"
                      " not ddp_spawn, ddp_fork, ddp_notebook)", str,
                      check=lambda v: v in _strategies())
    precision: one_of(*PRECISIONS)
    max_epochs: PositiveInt
    max_time: Optional[real("minutes > 0, or null", gt=0)] = None
    log_every_n_steps: PositiveInt
    enable_progress_bar: Bool
    num_sanity_val_steps: accepts("an integer >= -1", StrictInt, ge=-1) = 0


class ImageDataConfig(Built):  # lipvae.data.ImageDataModule's arguments
    name: one_of(*DATASETS)
    root: Optional[accepts("an existing folder holding the IDX files, or null to search", str,
                           check=lambda v: Path(v).expanduser().is_dir())] = None
    batch_size: PositiveInt
    eval_batch_size: PositiveInt
    val_fraction: Unit
    resplit: TriState
    resplit_test_fraction: Unit
    limit: PositiveOrNull = None
    download: Bool = True


class CoupledConfig(Closed):
    samples: accepts("an integer >= 100", StrictInt, ge=100)
    alpha: real("a number in (0, 0.5]", gt=0, le=0.5)
    seed: NonnegInt


class CertifyConfig(Built):
    r: listed("a list of numbers > 0", Positive)
    p: listed("a list of numbers in (0, 1)", Unit)
    forms: listed(f"a list drawn from {', '.join(CERTIFY_FORMS)}", Literal[tuple(CERTIFY_FORMS)])
    coupled: CoupledConfig


class LatentConfig(Closed):
    kind: one_of("hard", "soft")
    budget: Optional[Nonneg] = None   # required by the hard attack
    penalty: Optional[Nonneg] = None  # and these two by the soft one
    lr: Optional[Positive] = None
    num_inputs: PositiveInt
    steps: PositiveInt


class MarginsConfig(Closed):  # which margins an evaluation computes, on which inputs; the latent attack
    certify: Bool
    certified_inputs: PositiveOrNull = None
    attack: Bool
    attacked_inputs: PositiveInt
    latent: LatentConfig


class AttackConfig(Built):  # what every margin attack takes: arguments of its class
    r: Positive
    p: Unit
    samples: PositiveInt
    starts: PositiveInt
    max_radius: real("a positive number up to 1e6 (a radius in input space; float32 cannot hold much"
                     " larger ones)", gt=0, le=1e6)
    grid_step: Positive
    pixel_range: Bool


class PgdAttackConfig(AttackConfig):
    steps: PositiveInt
    tol: Positive
    search: one_of("bisection", "grid")
    compile: Bool = False
    warm_steps: NonnegInt = 0


class LbfgsConfig(Closed):
    maxcor: PositiveInt
    factr: Positive
    pgtol: Positive
    maxiter: PositiveInt


class LbfgsAttackConfig(AttackConfig):  # the reference procedure: none of pgd's steps, tolerance, warm starts
    lbfgs: LbfgsConfig


class OwnAttackConfig(AttackConfig):
    model_config = ConfigDict(extra="allow")  # a class of the user's: its own arguments too


#: the schema of an ``attack`` node by its ``_target_`` (an attack class of the user's: OwnAttack)
ATTACKS = {"lipvae.attack.PGDAttack": PgdAttackConfig, "lipvae.attack.LBFGSAttack": LbfgsAttackConfig}


class WandbConfig(Built):
    mode: one_of("offline", "online", "disabled")
    project: str
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = []


#: lipvae's own entries of ``callbacks`` and ``logger``, checked where present (the user's are
#: left to their classes)
ENTRIES = {"callbacks.early_stopping": EarlyStoppingConfig, "callbacks.finetune": FineTuneConfig, "logger.wandb": WandbConfig}


Objective = Literal[tuple(OBJECTIVES)]


class RootConfig(BaseModel):
    """The run's config; the top level also takes keys of the user's (for interpolations)."""

    model_config = ConfigDict(extra="allow")
    enc_L: Positive
    dec_L: Positive
    seed: accepts("an integer in [0, 2^32)", StrictInt, ge=0, lt=2**32)
    resume: TriState
    name: accepts("letters, digits and . _ = + , -, at most 200 (no path separators or '..': run folders stay"
                  " under outputs/)", str, check=lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+,-]*", v)
                  is not None and ".." not in v and len(v) <= 200)
    evaluate: one_of("best", "last")
    objective: accepts(f"one of {', '.join(OBJECTIVES)}, or a list of them (a multi-objective sweep)",
                       Objective | list[Objective], check=lambda v: v != []) = "test_elbo"
    # a figure's wall-clock budget per model in minutes, by tier (tier/cpu.yaml and official.yaml read it)
    budget_minutes: Optional[accepts("a mapping of tier names to minutes > 0, or null",
                                     dict[str, real("", gt=0)])] = None
    likelihood_floor: Optional[real("a number of nats, or null")] = None
    model: ModelConfig
    module: ModuleConfig
    trainer: TrainerConfig
    callbacks: Any = None  # named Lightning callbacks; lipvae's own checked as ENTRIES say
    logger: Any = None     # named Lightning loggers
    certify: CertifyConfig
    margins: MarginsConfig
    data: Any    # ImageData for lipvae's data module; another class checks its own arguments
    attack: Any  # by its _target_: ATTACKS


# ---- checking -------------------------------------------------------------------------------


#: what a field of a type accepts, in words (the constrained fields bring their own)
TYPE_WORDS = {"model_type": "a mapping of its fields", "dict_type": "a mapping", "string_type": "a string",
              "list_type": "a list"}


def check_node(node, schema: type[BaseModel], prefix: str = "") -> BaseModel:
    """``node`` (a config node, resolved here, or plain values) checked against ``schema``: an
    interpolation that cannot be resolved or the first refused field is one ``UserError`` naming
    its path (``prefix`` + its place in the node)."""
    try:
        values = OmegaConf.to_container(node, resolve=True, throw_on_missing=True) if OmegaConf.is_config(node) else node
    except Exception as e:
        key = getattr(e, "full_key", None) or prefix.rstrip(".") or "config"  # a full key counts from the root
        raise UserError(f"{key}: cannot be resolved ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    try:
        return schema.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        path = prefix + ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        if error["type"] == "extra_forbidden":
            others = [prefix + k for k in field_paths(OmegaConf.create(values))]
            raise UserError(no_such_field(path, [k for k in others if k != path and not k.startswith(path + ".")])) from None
        if error["type"] == "missing":
            raise UserError(f"{path}: missing; give it a value") from None
        words = error["msg"] if error["type"] == "accepted" else TYPE_WORDS.get(error["type"], error["msg"])
        if isinstance(error["input"], str) and re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?", error["input"].strip()):
            words += " (this is text, as ${oc.env:NAME} always is: '...=\"${oc.decode:${oc.env:NAME}}\"' reads a number)"
        fail(path, error["input"], words)


def schema_at(path: str, schema: type[BaseModel] = RootConfig) -> Any:
    """The type ``schema`` gives the field at the dotted ``path`` (``Optional`` and pydantic's
    ``Annotated`` unwrapped: a model class for a node it checks), None where it has no such field;
    at the root, lipvae's own callback and logger entries (``ENTRIES``) count as fields. The one
    walk of the schema by path: which fields are lists, which nodes are closed."""
    parts = path.split(".") if path else []
    if schema is RootConfig and ".".join(parts[:2]) in ENTRIES:
        schema, parts = ENTRIES[".".join(parts[:2])], parts[2:]
    node: Any = schema
    for part in parts:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return None
        node = _unwrapped(field.annotation)
    return node


def _unwrapped(kind: Any) -> Any:
    """``kind`` without ``Optional`` and without ``Annotated[...]`` metadata (pydantic strips the
    metadata of a field's own annotation, not of one inside ``Optional``)."""
    rest = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (Union, types.UnionType) and len(rest) == 1:
        kind = rest[0]
    return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind


def list_field(path: str, schema: type[BaseModel] = RootConfig) -> bool:
    """Whether the dotted ``path`` names a list field of ``schema``."""
    return typing.get_origin(schema_at(path, schema)) is list


def fail(path: str, value, accepted: str):
    value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    raise UserError(f"{path}: got {value!r}; accepted: {accepted}")


def check(ok: bool, path: str, value, accepted: str) -> None:
    """``fail`` unless ``ok``."""
    if not ok:
        fail(path, value, accepted)


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
