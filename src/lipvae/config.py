"""Checking a composed config, and composing one outside a Hydra app (``compose_config``).

Each check raises ``UserError`` with one line naming the field, the value given and
what is accepted, before any data is read or any model is built (``lipvae.build`` builds).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lipvae.build import (IMAGE_DATA, _entries, _entry_kinds, build_attack, build_certifier, build_layer,
                          target_class)
from lipvae.errors import UserError
from lipvae.schema import (ATTACK_SCHEMAS, ENTRIES, GROUPS, PgdAttackConfig, RootConfig, _dataclass_of, accepted_words,
                           attack_schema, check_fields, schema_field)
from lipvae.schema import check as _check


def validate(cfg: DictConfig, machine: bool = True) -> None:
    """Check the fields a user sets, before any data is read or any model is built: each
    schema field's constraint (lipvae.schema), then the rules that tie fields together and
    (``machine``) those that need the machine: a sweep submitted to a cluster leaves those to
    each job, on the node that runs it. Raises ``UserError`` on the first bad one."""
    _no_unused_fields(cfg)
    check_fields(cfg, "", RootConfig)
    for group, node in GROUPS.items():
        if group == "data" and cfg.data.get("_target_", IMAGE_DATA) != IMAGE_DATA:
            continue  # another data class checks its own arguments
        check_fields(cfg, group, attack_schema(cfg.attack) if group == "attack" else node)
    for path, node in ENTRIES.items():
        if OmegaConf.select(cfg, path) is not None:
            check_fields(cfg, path, node)
    _check_entry_classes(cfg)  # each callback's and logger's class, before any data is read
    lipschitz = cfg.model.kind == "lipschitz"
    if lipschitz:
        hidden = list(cfg.model.hidden)
        _check(all(h % 2 == 0 for h in hidden), "model.hidden", hidden, "even widths (GroupSort groups of 2)")
        build_layer(cfg.model)  # its class and arguments, before any data is read
        if cfg.margins.certify:
            m = cfg.model.latent_dim
            _check(m >= 2, "model.latent_dim", m,
                   "an integer >= 2 when certifying (the χ² bound; or margins.certify=false)")
    if machine:
        _validate_devices(cfg)
        _validate_accelerator(cfg)
    if cfg.margins.attack and cfg.attack.get("search") == "grid":
        step, top = cfg.attack.grid_step, cfg.attack.max_radius
        _check(top / step <= MAX_GRID, "attack.grid_step", step,
               f"at least attack.max_radius/{MAX_GRID} = {top / MAX_GRID:g} (at most {MAX_GRID} radii per input)")
    check_certified_inputs(cfg.margins, lipschitz)
    if cfg.margins.certify and lipschitz:
        build_certifier(cfg.certify)  # its class and arguments, before any data is read
    if cfg.margins.attack and machine:
        _check_attack_memory(cfg)
        build_attack(cfg.attack)
    if lipschitz and str(cfg.trainer.precision).startswith("64"):
        layer = str(cfg.model.layer.get("_target_", "")).rsplit(".", 1)[-1]
        _check(layer in ("BjorckLinear", "AOLLinear"), "trainer.precision", cfg.trainer.precision,
               f"32-true with model/layer={layer.removesuffix('Linear').lower()} (its weights stay float32;"
               " 64-true works with model/layer=bjorck|aol)")


def _check_attack_memory(cfg: DictConfig) -> None:
    """An attack whose Monte Carlo draws for a single input (``samples`` × ``starts`` latent
    vectors, each decoded) would not fit in this machine's free memory is refused before any
    work, with what it would need. A lower bound: the decoded images need more."""
    attack = cfg.attack
    samples, starts, inputs = attack.get("samples"), attack.get("starts"), cfg.margins.get("attacked_inputs")
    if not all(isinstance(v, int) for v in (samples, starts, inputs)):
        return
    # the attacked inputs go through the model together: samples × starts × inputs latent draws
    need = samples * starts * max(inputs, 1) * max(int(cfg.model.latent_dim), 1) * 4
    free = _free_memory()
    if free is not None and need > free:
        raise UserError(f"attack.samples, attack.starts: got {samples} and {starts} for {inputs} inputs, which need"
                        f" at least {need / 2**30:.1f} GiB (samples × starts × inputs latent draws, more for the"
                        f" decoded images); accepted: settings that fit the {free / 2**30:.1f} GiB free here"
                        " (e.g. attack.samples=40 attack.starts=5)")


def _free_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_certified_inputs(margins: DictConfig, lipschitz: bool) -> None:
    """Each attacked input's certificate is checked against its estimated margin, so the certified
    inputs (the first ``margins.certified_inputs``; null: all) include the attacked ones. The one
    place of this rule: ``validate``, ``evaluate`` and the margin callbacks call it."""
    if margins.attack and margins.certify and lipschitz and margins.certified_inputs is not None:
        certified, attacked = margins.certified_inputs, margins.attacked_inputs
        _check(certified >= attacked, "margins.certified_inputs", certified,
               f"null, or at least margins.attacked_inputs={attacked} (each attacked input's certificate is checked)")


#: The most radii the grid search may try per input (the reference's grid has 20: step 0.5 up to 10).
MAX_GRID = 1000



def _validate_accelerator(cfg: DictConfig) -> None:
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator: got {str(accelerator)!r}, but no CUDA device is visible; accepted: auto, cpu")
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "mps" and not (mps is not None and mps.is_available()):
        raise UserError("trainer.accelerator: got 'mps', but MPS is not available here; accepted: auto, cpu")


def _validate_devices(cfg: DictConfig) -> None:
    devices = cfg.trainer.devices
    if devices in (1, "auto") or cfg.trainer.strategy != "auto":
        return
    accelerator = cfg.trainer.accelerator
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise UserError(
            f"trainer.devices: got {devices} on CPU; accepted: 1, or several with a strategy named"
            " (trainer.strategy=ddp; each process then trains on a share of the batches)"
        )


def check_yaml_files(argv: list[str]) -> None:
    """Every YAML file of a ``--config-dir`` (``-cd``) given on the command line must parse: one
    line naming the file and the place, rather than Hydra's traceback."""
    import yaml

    for i, arg in enumerate(argv):
        folder = None
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            folder = argv[i + 1]
        elif arg.startswith("--config-dir="):
            folder = arg.split("=", 1)[1]
        if folder is None:
            continue
        if not Path(folder).is_dir():
            raise UserError(f"--config-dir: got {folder!r}; accepted: an existing folder of config groups")
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                yaml.safe_load(path.read_text())
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
                raise UserError(f"config: {path} is not valid YAML ({yaml_problem(e)})") from None


def yaml_problem(e: Exception) -> str:
    """Where and what a YAML parse error is, in a few words (``line 2, column 1: expected ...``)."""
    where = getattr(e, "problem_mark", None)
    at = f"line {where.line + 1}, column {where.column + 1}: " if where is not None else ""
    return at + (getattr(e, "problem", None) or str(e).splitlines()[0])


#: Hydra flags that take no value; with any other flag the command line is left to Hydra.
_PLAIN_FLAGS = ("-m", "--multirun")


def check_overrides(argv: list[str], config_module: str = "lipvae.conf", config_name: str = "config",
                    sweeps: str = "first") -> DictConfig | None:
    """Compose the command line's overrides once, before Hydra starts, and turn what Hydra would
    report in several lines (a mistyped key, an unknown choice of a config group, an override it
    cannot parse) into one ``UserError`` naming the field, what was given and what is accepted.
    A sweep (``a=1,2,3``) is checked at its first value; ``hydra`` settings are left to Hydra.
    Returns the composed config (None when another flag leaves the command line to Hydra)."""
    if any(a.startswith("-") and a not in _PLAIN_FLAGS for a in argv):
        return None
    overrides = parse_overrides([a for a in argv if a not in _PLAIN_FLAGS], sweeps=sweeps)
    return compose_config([o for o, _ in overrides], config_module, config_name)


def as_list_where_meant(text: str, root: type = RootConfig) -> str:
    """``certify.r=8`` where a list is meant is ``certify.r=[8]``: a single plain value (no
    brackets, no comma, no sweep function) of a field whose schema type is a list."""
    import typing

    key, eq, value = text.partition("=")
    if not eq or not value or value[0] in "[(" or "," in value or "(" in value or key.startswith(("+", "~")):
        return text
    found = schema_field(key.lstrip("+"), root)
    annotation = found.type if found is not None else None
    return f"{key}=[{value}]" if typing.get_origin(annotation) is list else text


def parse_overrides(texts: list[str], sweeps: str = "first") -> list[tuple[str, object]]:
    """Command-line overrides read by Hydra's own grammar, as ``(text, parsed Override)`` pairs;
    ``hydra.*`` settings are dropped. A sweep (``a=1,2,3``) is replaced by its first value
    (``sweeps="first"``: training checks a multirun at its first job) or refused in one line
    (``sweeps="refuse"``: commands that run once, where ``[1,2,3]`` is the list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    out = []
    for text in map(as_list_where_meant, texts):
        try:
            (o,) = parser.parse_overrides([text])
        except OverrideParseException as e:
            why = str(e).splitlines()[0]
            raise UserError(f"{text}: cannot be read as an override ({why}); write key=value") from None
        if o.key_or_group.split(".")[0].split("/")[0] == "hydra":
            continue
        if o.is_sweep_override():
            key = o.get_key_element()
            if sweeps == "refuse":
                raise UserError(f"{text}: a sweep, which only training runs (with -m); a list is written "
                                f"{key}=[{o.input_line.split('=', 1)[1]}]")
            if sweeps == "drop":  # each value is its own job's, checked by that job
                continue
            try:
                first = next(iter(o.sweep_string_iterator()))
            except Exception:  # a range or interval sweep: no first value to try here
                continue
            text = f"{key}={first}"
            (o,) = parser.parse_overrides([text])
        out.append((text, o))
    return out


def compose_config(overrides: list[str], config_module: str = "lipvae.conf", config_name: str = "config",
                   schema: type = RootConfig, config_dirs: tuple = ()) -> DictConfig:
    """Hydra's composition of ``config_name`` with ``overrides`` (outside any Hydra app); what
    Hydra would report in several lines is one ``UserError`` (``composition_error``).
    ``config_dirs``: more config folders, searched after the packaged ones (as training's
    ``--config-dir``)."""
    from hydra.errors import ConfigCompositionException

    search = [f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in config_dirs)}]"]

    def composed(items: list[str]) -> DictConfig:
        return copy.deepcopy(hydra_compose(config_module, config_name, tuple((search if config_dirs else []) + items)))

    try:
        return composed(overrides)
    except ConfigCompositionException as e:  # MissingConfigException included
        raise composition_error(e, overrides, composed, schema) from None


def composition_error(e: Exception, overrides: list[str], compose, schema: type = RootConfig) -> UserError:
    """The one line for what Hydra could not compose: an unknown choice of a group, a value the
    schema's type refuses, a field that does not exist (with the closest one, found by composing
    ``compose(overrides without it)``)."""
    from hydra.errors import MissingConfigException

    message = str(e)
    if isinstance(e, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
        options = re.findall(r"^\t(\S+)$", message.split("Config search path")[0], flags=re.M)
        if found is None:
            return UserError(message.splitlines()[0])
        group, choice = found.groups()
        return UserError(f"{group}: got {choice!r}; accepted: {', '.join(options)}")
    wrong_type = _validation_error(e, schema)
    if wrong_type is not None:
        return wrong_type
    found = re.search(r"Could not override '([^']+)'", message)
    if found is None:
        return UserError(message.splitlines()[0])
    key = found.group(1)
    rest = [o for o in overrides if o.split("=", 1)[0] != key]
    try:
        others = compose(rest)
        keys = field_paths(others)
    except Exception:
        others, keys = None, []
    if others is not None and key.startswith("attack.") and key.count(".") == 1:
        try:
            _not_this_attacks(key, others.attack)
        except UserError as other_attacks:
            return other_attacks
    hint = f" (to add a new field, write +{key}=...)" if _open_node(key.rpartition(".")[0]) else ""
    return UserError(f"{no_such_field(key, keys)}{hint}")


@functools.lru_cache(maxsize=32)
def hydra_compose(config_module: str, config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """Hydra's composition, once per process for the same overrides (a process that evaluates
    several runs composes once); a failure is not cached, so each call reports it. Shared: do
    not modify what it returns (``compose_config`` hands out copies)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module=config_module):
        return compose(config_name=config_name, overrides=list(overrides))


def _no_unused_fields(cfg: DictConfig) -> None:
    """A field that ``+key=value`` added to a node of a schema class would be ignored by the object
    built from it: refused in one line, as a mistyped key is (an open node takes any)."""
    def walk(node, schema: type, prefix: str) -> None:
        known = {f.name: f for f in dataclasses.fields(schema)}
        for key in node:
            path = f"{prefix}{key}"
            if key not in known:
                others = [k for k in field_paths(cfg) if k != path and not k.startswith(path + ".")]
                raise UserError(no_such_field(path, others))
            inner = _dataclass_of(known[key].type)
            if inner is not None and isinstance(node[key], DictConfig):
                walk(node[key], inner, path + ".")

    for group, schema in GROUPS.items():  # the top level takes keys of the user's (for interpolations)
        if group == "data" and cfg.data.get("_target_", IMAGE_DATA) != IMAGE_DATA:
            continue  # another data class takes its own arguments
        if group == "attack" and cfg.attack.get("_target_") not in ATTACK_SCHEMAS:
            continue  # an attack class of the user's takes its own arguments
        walk(cfg[group], attack_schema(cfg.attack) if group == "attack" else schema, group + ".")
    for path, schema in ENTRIES.items():  # lipvae's own callbacks and loggers, where present
        node = OmegaConf.select(cfg, path)
        if isinstance(node, DictConfig):
            walk(node, schema, path + ".")


def _open_node(path: str) -> bool:
    """Whether a node takes fields of the user's (``+key=value``): one the schema leaves untyped
    (``logger``, ``callbacks``, a layer's or data class's own arguments), not a schema class."""
    f = schema_field(path) if path else None  # a group's own node has no field: closed
    return f is not None and _dataclass_of(f.type) is None


def _not_this_attacks(key: str, attack: DictConfig) -> None:
    """One line for another attack's field (``attack=lbfgs attack.steps=5``): L-BFGS-B's schema
    has none of pgd's settings, and adding one would not be used."""
    theirs = {f.name for f in dataclasses.fields(PgdAttackConfig)} - {
        f.name for f in dataclasses.fields(attack_schema(attack))}
    if key.split(".")[1] in theirs:
        name = str(attack.get("_target_", "")).rsplit(".", 1)[-1]
        raise UserError(f"{key}: no such field of {name}, which takes none of pgd's {', '.join(sorted(theirs))}")


def _validation_error(error: Exception, schema: type = RootConfig) -> UserError | None:
    """The one line for a value the schema's type refused at composition (``seed=abc``,
    ``model.kind=wild``), or None when the error is something else."""
    from omegaconf.errors import ValidationError

    cause = error
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__
    if cause is None or not getattr(cause, "full_key", None):
        return None
    path = re.sub(r"\[\d+\]$", "", cause.full_key)  # an element of a list: name the list
    members = re.search(r"expected one of \[([^\]]*)\]", str(cause))
    words = accepted_words(path, members.group(1).split(", ") if members else None, schema)
    return UserError(f"{path}: got {cause.value!r}; accepted: {words}")


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


def _check_entry_classes(cfg: DictConfig) -> None:
    for path, (base, accepted) in _entry_kinds().items():
        for field, spec in _entries(cfg, path).items():
            target_class(field, spec._target_, base, accepted)


