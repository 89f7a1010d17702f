"""A run folder's record is never lost: checks made before anything is written to it.

Hydra is told not to write ``.hydra/`` itself (``hydra.output_subdir: null``); lipvae writes it
once these checks pass, so a refused command leaves a folder exactly as it found it.

- A folder that holds a completed run is refused unless ``resume=true`` (then there is nothing
  to do, and the record stays).
- ``resume=true`` needs ``checkpoints/last.ckpt``, and the config given must equal the stored
  one except for the keys in ``MAY_DIFFER_ON_RESUME`` (and the evaluation's settings).
  ``resume=auto`` resumes when there is a checkpoint and starts afresh otherwise (for jobs that
  a cluster requeues).
- A folder is claimed by one process at a time (an exclusive lock on ``.lipvae.lock``), so two
  runs started in the same second with the same name do not mix their files.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lipvae.errors import UserError, unwritable
from lipvae.results import RunFolder, check_record_version
from lipvae.safety import UnsafeFile, check_entries, read_regular

# keys a resumed run may change: bookkeeping, the time budget, and the learning rate (to
# recover from a diverged run from its last finite state)
MAY_DIFFER_ON_RESUME = ("resume", "module.lr", "trainer.enable_progress_bar", "trainer.max_time",
                        "module.num_importance", "objective", "likelihood_floor")
# ... the evaluation's settings: the trained state does not depend on them, and the evaluation
# of a resumed run starts over with the settings given; and the loggers
MAY_DIFFER_PREFIXES = ("attack.", "certify.", "margins.", "logger.")
LOCK_FILE = ".lipvae.lock"


class RunFolderError(UserError):
    """A refusal made before anything was written: the folder is left as it was."""


class AlreadyCompleted(Exception):
    """``resume=true`` on a completed run: nothing to do."""


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_differences(stored: DictConfig, given: DictConfig) -> list[str]:
    """Dotted keys whose values differ, less those a resume may change: as written, and (where
    they are written differently, e.g. ``dec_L: ${enc_L}`` and ``dec_L: 5.0``, or a name pattern
    changed by a newer lipvae) once resolved, where both resolve."""
    a, b = (_flat(OmegaConf.to_container(c, resolve=False)) for c in (stored, given))
    a_resolved, b_resolved = (_resolved(c) for c in (stored, given))
    return [
        k for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
        and (a_resolved is None or b_resolved is None or a_resolved.get(k, "<absent>") != b_resolved.get(k, "<absent>"))
        and k not in MAY_DIFFER_ON_RESUME and not k.startswith(MAY_DIFFER_PREFIXES)
    ]


def _resolved(cfg: DictConfig) -> dict | None:
    try:
        return _flat(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # an interpolation that does not resolve here: compare as written
        return None


def check_run_folder(cfg: DictConfig, run_dir: Path) -> None:
    """Raise ``RunFolderError`` (or ``AlreadyCompleted``) before anything is written. ``cfg`` is
    validated (``resume`` is true, false or auto: the schema checks it)."""
    resume = cfg.resume
    folder = RunFolder(run_dir)
    if run_dir.exists():
        try:
            check_entries(run_dir)  # before anything below reads it: .hydra/ itself may be a planted link
        except UnsafeFile as e:
            raise RunFolderError(str(e)) from None
    status, last = folder.status(), folder.last_checkpoint
    if resume == "auto":  # what a requeued cluster job uses: continue if there is anything to continue
        if status != "completed" and not last.is_file():
            return
        resume = True
    if not resume:
        if status == "completed":
            raise RunFolderError(
                f"run: {run_dir} already holds a completed run; its record is kept. Leave hydra.run.dir"
                " unset for a new folder, or add resume=true to check it"
            )
        if last.is_file():
            raise RunFolderError(
                f"run: {run_dir} holds an unfinished run ({status or 'no results yet'}) with a checkpoint;"
                " add resume=true to continue it, or leave hydra.run.dir unset for a new folder"
            )
        return
    try:
        check_record_version(run_dir, "resume")
    except UserError as e:
        raise RunFolderError(str(e)) from None
    stored = folder.config_file
    if stored.is_file():
        try:
            recorded = OmegaConf.create(read_regular(stored))
        except UnsafeFile as e:
            raise RunFolderError(str(e)) from None
        diff = config_differences(recorded, cfg)
        if diff:
            shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise RunFolderError(
                f"resume: the config given differs from the one stored in {stored} at {shown};"
                " resume with the run's original overrides"
            )
    if status == "completed":
        raise AlreadyCompleted(f"run {run_dir} is already completed; nothing to resume (its record is kept)")
    if not last.is_file():
        raise RunFolderError(
            f"resume: {last} does not exist, so there is nothing to resume;"
            " drop resume=true to start a new run"
        )


TRAINING_HINT = ("(two runs started in the same second with the same name?); start this one again, or set"
                 " hydra.run.dir")


def claim(run_dir: Path, hint: str = TRAINING_HINT) -> FileLock:
    """Hold an exclusive lock on the folder (``filelock``, on ``.lipvae.lock``) until the returned
    lock is released or the process ends; refuse if another process holds it (``hint``: what the
    refused command should do). The lock file names the holder's PID."""
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_entries(run_dir)  # no planted symlink or special file among lipvae's own names
        lock = FileLock(str(path))
        lock.acquire(timeout=0)
    except UnsafeFile as e:
        raise RunFolderError(str(e)) from None
    except Timeout:
        raise RunFolderError(f"run: {run_dir} is in use by another lipvae process {hint}") from None
    except OSError as e:
        if unwritable(e) is None:
            raise
        raise RunFolderError(f"run: cannot write to {run_dir} ({e.strerror}); make it writable or choose another"
                             " folder (hydra.run.dir)") from None
    _note_stale_lock(path, run_dir)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_TRUNC)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return lock


def release(lock: FileLock) -> None:
    """Give up a claim, emptying the lock file first: a PID left in it means a process that was
    killed before it could do this, and the next claim says so (``_note_stale_lock``)."""
    try:
        os.close(os.open(lock.lock_file, os.O_WRONLY | os.O_NOFOLLOW | os.O_TRUNC))
    except OSError:  # the folder went read-only or away: the lock goes with the process anyway
        pass
    lock.release()


def _note_stale_lock(path: Path, run_dir: Path) -> None:
    """A log line when the lock file names a process that has gone (killed before it could tidy
    up): the kernel released its lock with it, and this process takes the folder over."""
    import logging

    try:
        previous = int(path.read_text().strip() or 0)
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if previous and previous != os.getpid():
        try:
            os.kill(previous, 0)
        except ProcessLookupError:
            logging.getLogger("lipvae").info("%s: taking over the lock of process %d, which has ended", run_dir, previous)
        except PermissionError:
            pass


def save_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra writes to ``.hydra/`` (config, hydra, overrides), once the checks have passed."""
    hc = HydraConfig.get()
    out = RunFolder(run_dir).hydra
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc, resolve=False)}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")
