"""Run outputs: ``results.json`` (docs/results.md) and tables, written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: the version of what a run records (results.json and the config beside it). 2 (2026-12-07): the
#: config's groups as today (tier and experiment apart, the checkpoints' entries, no margin
#: callbacks); 3 (2026-12-07): every default in the YAML files (no schema defaults: an MLP's
#: model.arch has no channels, margins/latent=hard names penalty and lr as null, budget_minutes
#: at the top) and the Lightning classes' targets under lipvae.lightning. The numbers of
#: results.json are as in 1, which the report still reads
SCHEMA_VERSION = 3
RESULTS_FILE = "results.json"

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
    """The one way lipvae replaces a file: ``write(partial)`` fills a new file beside ``path``
    (``.<name>.<random>.tmp``, with the mode a plain ``open`` gives: 0666 less the umask), which
    is flushed to disk and then renamed over ``path``, so readers see the old file or the whole
    new one; on any error (a full disk, a signal) the partial file is removed and ``path`` is
    left as it was. A rename never writes through a symlink planted at ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def torch_save(obj, path: Path) -> None:
    """``torch.save`` into memory, then written to ``path`` by Python: a failed write (a full
    disk, a file-size limit) is the ``OSError`` it is, never the C++ writer's ``RuntimeError``
    (whose text varies), so every caller's handling of a full disk applies."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` written to ``path`` by ``replace_atomically``."""
    replace_atomically(path, lambda partial: partial.write_text(text))


class ResultsError(ValueError):
    """A results.json that is missing, unreadable or not a record (the reason in words)."""


@dataclass
class Results:
    """``results.json`` (docs/results.md), one field per top-level key: the one writer and the
    one reader of the file. The parts are plain dicts (their keys are documented there); a
    record of another lipvae version keeps what it has, and unknown top-level keys go to
    ``extra`` and back unchanged."""

    status: str
    error: str | None = None
    run: dict | None = None
    config: dict | None = None
    model: dict | None = None
    lipschitz: dict | None = None
    data: dict | None = None
    metrics: dict | None = None
    certified: dict | None = None
    estimated: dict | None = None
    latent_attack: dict | None = None
    soundness_violations: int | None = None
    coupled_exceedances: dict | None = None
    timings: dict | None = None
    evaluation: dict | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    #: the parts an evaluation owns and rewrites together (``lipvae.evaluate --replace``)
    EVALUATION_PARTS = ("certified", "estimated", "latent_attack", "soundness_violations", "coupled_exceedances")

    @classmethod
    def from_dict(cls, record) -> "Results":
        if not isinstance(record, dict):
            raise ResultsError(f"a JSON {type(record).__name__}, not an object")
        known = {f.name for f in fields(cls)} - {"extra"}
        parts = {k: v for k, v in record.items() if k in known}
        return cls(**{"status": "unknown", "schema_version": None, **parts}, extra={k: v for k, v in record.items() if k not in known})

    @classmethod
    def read(cls, run_dir: Path) -> "Results":
        """The run's record; ``ResultsError`` (missing, unreadable, not an object) otherwise."""
        from lipvae.safety import UnsafeFile, read_regular

        path = Path(run_dir) / RESULTS_FILE
        try:
            text = read_regular(path)  # no symlink, FIFO or device: a shared run folder is data
        except FileNotFoundError:
            raise ResultsError(f"missing {RESULTS_FILE}") from None
        except UnsafeFile as e:
            raise ResultsError(f"refused {RESULTS_FILE} ({str(e).rsplit(': ', 1)[-1].split(';')[0]})") from None
        except (OSError, ValueError) as e:  # ValueError: not UTF-8
            raise ResultsError(f"unreadable {RESULTS_FILE} ({type(e).__name__})") from None
        try:
            return cls.from_dict(json.loads(text))
        except ResultsError as e:
            raise ResultsError(f"unreadable {RESULTS_FILE} ({e})") from None
        except ValueError as e:
            raise ResultsError(f"unreadable {RESULTS_FILE} ({type(e).__name__})") from None

    @classmethod
    def status_of(cls, run_dir: Path) -> str | None:
        """The recorded status, or None where there is no readable record."""
        try:
            return cls.read(run_dir).status
        except ResultsError:
            return None

    def get(self, part: str, *keys):
        """A nested value (``get("certified", "mean")``), None where any step is missing."""
        value = getattr(self, part) if part in self.__dataclass_fields__ else self.extra.get(part)
        for k in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(k)
        return value

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {"schema_version": out.pop("schema_version"), **out, **self.extra}
        if self.status == "completed":  # a finished run's record has every part, null where none
            return {k: v for k, v in out.items() if v is not None or k not in ("error", "evaluation")}
        return {k: v for k, v in out.items() if v is not None or k in ("status", "error")}

    def write(self, run_dir: Path) -> Path:
        """The record as ``<run_dir>/results.json``, atomically (NaN and inf as null)."""
        path = Path(run_dir) / RESULTS_FILE
        atomic_write_text(path, json.dumps(_plain(self.as_dict()), indent=2, allow_nan=False) + "\n")
        return path


def check_record_version(run_dir: Path, doing: str) -> None:
    """A run recorded under another version of the record (``SCHEMA_VERSION``) is refused in one
    line before anything is read from it: its config does not compose with today's groups.
    ``doing``: what was asked (resume, evaluate). A folder without a readable, versioned
    results.json (a run killed in training, a corrupt or foreign file: lipvae has written the
    version since its first release) is left to the caller's own checks."""
    from lipvae.errors import UserError

    try:
        record = Results.read(run_dir)
    except ResultsError:
        return
    if record.schema_version is not None and record.schema_version != SCHEMA_VERSION:
        code = (record.run or {}).get("code") if isinstance(record.run, dict) else None
        raise UserError(
            f"run: {run_dir} was recorded with record version {record.schema_version} and this lipvae reads"
            f" version {SCHEMA_VERSION}; to {doing} it, use the lipvae that recorded it"
            f"{f' (code {code})' if code else ''}, or train the run again")


FROZEN_MODEL = "frozen_model.pt"


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and the files lipvae keeps in it: the one place for their names."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        """What a resume continues from (written every epoch and on a stop)."""
        return self.checkpoints / "last.ckpt"

    @property
    def frozen_model(self) -> Path:
        """The evaluated weights, frozen (what re-evaluations load)."""
        return self.path / FROZEN_MODEL

    @property
    def hydra(self) -> Path:
        return self.path / ".hydra"

    @property
    def config_file(self) -> Path:
        return self.hydra / "config.yaml"

    @property
    def hydra_file(self) -> Path:
        return self.hydra / "hydra.yaml"

    @property
    def evaluations(self) -> Path:
        """Re-evaluations, one folder each (``lipvae.evaluate``)."""
        return self.path / "evaluations"

    def results(self) -> Results:
        return Results.read(self.path)

    def status(self) -> str | None:
        return Results.status_of(self.path)


def write_table(path: Path, frame) -> Path:
    """A pandas DataFrame as CSV, atomically."""
    atomic_write_text(Path(path), frame.to_csv(index=False))
    return Path(path)


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
