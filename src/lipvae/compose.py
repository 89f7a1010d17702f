"""Composing a config outside a Hydra app (``compose_config``: the evaluate and certify commands,
the tests) and reading a command line's overrides by Hydra's grammar before Hydra starts; what
Hydra cannot compose is ``lipvae.config.composition_error``'s one line."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from omegaconf import DictConfig

from lipvae.config import composition_error
from lipvae.errors import UserError
from lipvae.schema import RootConfig, list_field


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
    key, eq, value = text.partition("=")
    if not eq or not value or value[0] in "[(" or "," in value or "(" in value or key.startswith(("+", "~")):
        return text
    return f"{key}=[{value}]" if list_field(key.lstrip("+"), root) else text


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
                   config_dirs: tuple = ()) -> DictConfig:
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
        raise composition_error(e, overrides, composed) from None


@functools.lru_cache(maxsize=32)
def hydra_compose(config_module: str, config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """Hydra's composition, once per process for the same overrides (a process that evaluates
    several runs composes once); a failure is not cached, so each call reports it. Shared: do
    not modify what it returns (``compose_config`` hands out copies)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module=config_module):
        return compose(config_name=config_name, overrides=list(overrides))
