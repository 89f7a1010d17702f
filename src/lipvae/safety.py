"""A run folder from elsewhere is data, never code, and never a way to reach files outside it.

Researchers share run folders, so everything lipvae reads from one is treated as untrusted:

- **Targets.** A stored config is only ever built from ``_target_`` names that lipvae's packaged
  configs use (its layers, attacks, data modules, callbacks, loggers), or that the user gave
  this process (command-line overrides, their own ``--config-dir``). ``check_targets`` walks the
  whole resolved config, nested ``_args_`` included, and refuses any other name in one line
  before anything is imported or called.
- **Files.** ``read_regular`` opens a file without following a symlink and refuses anything but
  a regular file (a FIFO would block forever, ``/dev/zero`` never ends), with a size cap.
  ``check_entries`` refuses a run folder in which one of lipvae's own files or folders is a
  symlink or a special file, before anything is written to it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lipvae.errors import UserError

#: the most a text file that lipvae reads back from a run folder may hold (results.json, configs)
MAX_TEXT_BYTES = 64 * 2**20

#: names lipvae writes inside a run folder: none of them may be a symlink or a special file
RUN_ENTRIES = (".lipvae.lock", ".hydra", "checkpoints", "evaluations", "csv", "train.log", "results.json",
               "frozen_model.pt", "margins.csv", "certified_margins.csv", "estimated_margins.csv",
               "certified_margins.png", "certified_vs_estimated.png", "latent_attack.png", "reconstructions.png",
               "prior_samples.png", "aggregate_posterior.png", "evaluation.json")
#: names ``lipvae.report`` writes in its output folder
REPORT_ENTRIES = ("report.md", "report.html", "results.csv", "latent_attack_pair.png", "estimated_margins.png",
                  "likelihood_vs_robustness.png", "certified_vs_estimated.png", "fixed_sigma_grid.png",
                  "latent_2d.png", "tightness.png", "aggregate_posterior_and_samples.png", "multirun.yaml",
                  "optuna_front.png")
#: folders whose entries are checked one level down too
RUN_FOLDERS = (".hydra", "checkpoints", "evaluations", "csv")


class UnsafeFile(UserError):
    """A file lipvae would read or write is a symlink, a special file or too large."""


def _describe(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def read_regular(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """The text of ``path``, opened without following a symlink and without blocking; refused in
    one line (``UnsafeFile``) unless it is a regular file of at most ``limit`` bytes.
    ``FileNotFoundError`` where there is nothing at all."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():  # the last component is a symlink
            raise UnsafeFile(f"{path}: is a symlink; lipvae reads only regular files of a run folder") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path}: is {_describe(info.st_mode)}; lipvae reads only regular files of a run folder")
        if info.st_size > limit:
            raise UnsafeFile(f"{path}: holds {info.st_size} bytes, more than the {limit} a lipvae record can have")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise UnsafeFile(f"{path}: grew past {limit} bytes while being read")
    return data.decode("utf-8")


def check_entries(folder: Path, names=RUN_ENTRIES, subfolders=RUN_FOLDERS) -> None:
    """Refuse (``UnsafeFile``, one line) a folder in which one of lipvae's own entries is a symlink
    or a special file (the folders in ``subfolders`` are checked one level down as well), so that
    nothing lipvae then writes can land outside the folder or block on a FIFO."""
    folder = Path(folder)
    if folder.is_symlink():
        raise UnsafeFile(f"{folder}: is a symlink; give the run folder itself")
    for name in names:
        _check_entry(folder / name, directory=name in subfolders)
    for name in subfolders:
        sub = folder / name
        if not sub.is_dir() or sub.is_symlink():
            continue
        for entry in sub.iterdir():
            _check_entry(entry, directory=None)
            if name == "evaluations" and entry.is_dir() and not entry.is_symlink():
                for inner in entry.iterdir():
                    _check_entry(inner, directory=None)


def _check_entry(path: Path, directory: bool | None) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsafeFile(f"{path}: is {_describe(mode)}; lipvae refuses to follow or open it (remove it,"
                         " or copy the run without links)")
    if directory is True and not stat.S_ISDIR(mode):
        raise UnsafeFile(f"{path}: is a file where lipvae keeps a folder; remove or rename it")
    if directory is False and stat.S_ISDIR(mode):
        raise UnsafeFile(f"{path}: is a folder where lipvae keeps a file; remove or rename it")


# --- targets -------------------------------------------------------------------------------

#: where lipvae's own configs allow a class family by module rather than by name: the extra
#: callbacks and loggers README shows (``+callbacks.swa._target_=lightning.pytorch.callbacks...``)
TRUSTED_PREFIXES = {"callbacks": ("lightning.pytorch.callbacks.",), "logger": ("lightning.pytorch.loggers.",)}


def packaged_config(*parts: str) -> dict:
    """A config file shipped in ``lipvae.conf`` (``packaged_config("certify", "default.yaml")``),
    read as plain data by OmegaConf's safe loader, without its ``defaults`` list and without a
    Hydra composition (which an app of the user's may hold)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.create(resources.files("lipvae.conf").joinpath(*parts).read_text()))
    node.pop("defaults", None)
    return node


@lru_cache(maxsize=1)
def packaged_targets() -> frozenset[str]:
    """Every ``_target_`` that lipvae's packaged configs (``lipvae.conf``) name."""
    return frozenset(targets_in_folder(Path(str(resources.files("lipvae.conf")))))


def targets_in_folder(folder: Path) -> set[str]:
    """The ``_target_`` values of a config folder's YAML files (lipvae's own, or a user's
    ``--config-dir``); files that do not parse are skipped (composition reports them)."""
    import yaml

    found: set[str] = set()
    for path in sorted(Path(folder).rglob("*.yaml")) if Path(folder).is_dir() else []:
        try:
            found |= targets_in(yaml.safe_load(path.read_text()))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
    return found


def targets_in(node) -> set[str]:
    """The ``_target_`` values anywhere in a plain container (dicts and lists)."""
    out: set[str] = set()
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            out.add(target)
        for value in node.values():
            out |= targets_in(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            out |= targets_in(value)
    return out


def untrusted_targets(node, trusted: set[str] | frozenset[str], path: str = "") -> list[tuple[str, object]]:
    """``(field, target)`` for each ``_target_`` of ``node`` (a plain container) outside
    ``trusted`` (or outside the class families of ``TRUSTED_PREFIXES`` for a top-level entry of
    ``callbacks`` or ``logger``)."""
    bad: list[tuple[str, object]] = []
    if isinstance(node, dict):
        if "_target_" in node:
            target = node["_target_"]
            parts = path.split(".")
            family = TRUSTED_PREFIXES.get(parts[0], ()) if len(parts) == 2 else ()
            if not isinstance(target, str) or (target not in trusted and not target.startswith(family)):
                bad.append((f"{path}._target_" if path else "_target_", target))
        for key, value in node.items():
            bad += untrusted_targets(value, trusted, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            bad += untrusted_targets(value, trusted, f"{path}[{i}]")
    return bad


def check_targets(node, source: Path | str, trusted: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse, in one line and before anything is imported or built, a stored config ``node`` (a
    plain, resolved container) that names a ``_target_`` neither lipvae's configs nor the user's
    own (``trusted``: those of the config this process composed from its command line and of the
    user's config folders) use."""
    trusted = packaged_targets() | set(trusted)
    bad = untrusted_targets(node, trusted)
    if bad:
        field, target = bad[0]
        raise UserError(f"{field}: {source} names the target {str(target)[:120]!r}, which lipvae does not build"
                        " from a stored run; accepted: lipvae's own classes, or ones you pass yourself"
                        " (--config-dir with the config that names it). Nothing was run")


class NoFollowFileHandler(logging.FileHandler):
    """Hydra's job log (``train.log``) opened without following a symlink: where the file is a
    symlink or a special file, nothing is written to it (the run folder's check then refuses the
    run in one line), so a planted link never gets a run's log appended to its target."""

    def _open(self):
        path = self.baseFilename
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o666)
        except OSError:
            return open(os.devnull, "w", encoding=self.encoding)  # noqa: SIM115 - the handler owns it
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return open(os.devnull, "w", encoding=self.encoding)  # noqa: SIM115
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
