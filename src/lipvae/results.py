"""Run outputs: ``results.json`` (docs/results.md) and tables, written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (an absent value), tensors and numpy scalars become numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_atomically(path: Path, write) -> None:
    """``write(partial)`` fills ``<path>.partial``, which then replaces ``path``; on any error
    (a full disk, a signal) the partial file is removed and ``path`` is left as it was."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers see the
    old file or the whole new one, never a half-written one. The file gets the mode a plain
    ``open`` would give it (0666 less the umask, so 0644 usually), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(run_dir: Path, results: dict) -> Path:
    results = {"schema_version": SCHEMA_VERSION, **results}
    path = Path(run_dir) / RESULTS_FILE
    atomic_write_text(path, json.dumps(_plain(results), indent=2, allow_nan=False) + "\n")
    return path


def write_table(path: Path, frame) -> Path:
    """A pandas DataFrame as CSV, atomically."""
    atomic_write_text(Path(path), frame.to_csv(index=False))
    return Path(path)


def read_results(run_dir: Path) -> dict:
    with open(Path(run_dir) / RESULTS_FILE) as f:
        return json.load(f)


def code_version() -> str:
    """The git commit of the source checkout lipvae runs from (``+dirty`` with local edits),
    or the package version when it was installed from a wheel."""
    import subprocess

    import lipvae

    here = Path(lipvae.__file__).resolve().parent
    if not (here.parents[1] / ".git").exists():  # installed from a wheel: no checkout to ask
        return f"lipvae {lipvae.__version__}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"lipvae {lipvae.__version__}"
