"""The command ``python -m lipvae.train [overrides] [-m]``: reads the command line (one line on
a mistake, exit 2), lets Hydra compose the config once, checks it once before anything is
written, claims the run folder, and runs ``lipvae.training.run`` with the failures turned into
records, exit codes and resume hints (signals, a sweep's launcher gone, a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from lipvae.compose import as_list_where_meant, check_overrides, check_yaml_files, compose_config, parse_overrides
from lipvae.config import composition_error, validate
from lipvae.errors import NO_SPACE, UserError, signals_stop
from lipvae.logs import quiet_third_party
from lipvae.lightning.module import NonFiniteLossError
from lipvae.lightning.callbacks import StopBetweenSteps
from lipvae.results import Results, RunFolder, atomic_write_text
from lipvae.runfolder import AlreadyCompleted, check_run_folder, claim, release, save_hydra_files
from lipvae.sweep import note_refusal
from lipvae.training import RunContext, run

log = logging.getLogger("lipvae")


def _record(cfg: DictConfig, run_dir: Path, status: str, error: str) -> None:
    """Record a failed or interrupted attempt; never over a completed record (beside it instead)."""
    record = Results(status=status, error=error, config=OmegaConf.to_container(cfg, resolve=False))
    if RunFolder(run_dir).status() == "completed":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        attempt = {"status": status, "error": error, "config": record.config}
        atomic_write_text(run_dir / f"attempt-{stamp}-{status}.json", json.dumps(attempt, indent=2) + "\n")
    else:
        record.write(run_dir)


_signal: dict = {"received": None}


def _other_rank() -> bool:
    """A process that Lightning started for a device other than the first (DDP)."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("LOCAL_RANK", "NODE_RANK"))


class Stop(Exception):
    """A run that ends without results: ``code`` for the process (0: nothing to do), ``status``
    and ``error`` for its record."""

    def __init__(self, code: int, error: str, status: str = "failed") -> None:
        super().__init__(error)
        self.code, self.error, self.status = code, error, status


def _as_stop(e: BaseException, ctx: RunContext) -> Stop | None:
    """What a run's exception means for the user: a Stop, or None for a bug (shown with its trace)."""
    if isinstance(e, (UserError, NonFiniteLossError)):
        message = str(e).splitlines()[0]
        if isinstance(e, NonFiniteLossError) and RunFolder(ctx.run_dir).last_checkpoint.is_file():
            message += f"; last finite state saved: {ctx.resume_hint()}"
        return Stop(2, message)
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return Stop(2, f"no space left while writing to the run folder {ctx.run_dir} ({e.strerror}); free space,"
                       f" then {ctx.resume_hint()}")
    # our handler raises KeyboardInterrupt; Lightning turns it into SystemExit(1) after its graceful stop
    if isinstance(e, (KeyboardInterrupt, SystemExit)) and not (
            _signal["received"] is None and isinstance(e, SystemExit) and e.code in (0, None)):
        signum = _signal["received"] or signal.SIGINT
        return Stop(128 + int(signum), f"interrupted ({signal.Signals(signum).name}); {ctx.resume_hint()}",
                    "interrupted")
    return None


@contextlib.contextmanager
def recorded(cfg: DictConfig, ctx: RunContext, rank_zero: bool = True):
    """Run the body with SIGTERM/SIGINT as a stop; a failure or stop is recorded in the run folder
    and ends the process with its exit code (2: the user's input, 128 + n: signal n). In a sweep,
    the other jobs go on: the failure is recorded and the job returns (a signal still stops all)."""
    _signal["received"] = None
    # SIGTERM/SIGINT raise KeyboardInterrupt, which Lightning treats as a graceful stop (the last state
    # saved during fit); during training they wait for the step in progress (StopBetweenSteps)
    with signals_stop(_signal, StopBetweenSteps.defer):
        try:
            yield
        except BaseException as e:  # noqa: BLE001 (sorted by _as_stop; anything else is re-raised)
            stop = _as_stop(e, ctx)
            if stop is None:
                if isinstance(e, SystemExit):
                    raise
                if rank_zero:
                    _record(cfg, ctx.run_dir, "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if not ctx.multirun:
                    raise
                log.exception("job failed")  # a bug in one job: recorded, shown, and the sweep goes on
                return
            try:
                if rank_zero:
                    _record(cfg, ctx.run_dir, stop.status, stop.error)
            except OSError as err:  # the disk may still be full
                log.error("could not record the failure (%s)", err.strerror)
            log.error("%s", stop.error)
            if ctx.multirun and stop.code == 2:  # the report lists this job as failed
                return
            print(f"error: {stop.error}", file=sys.stderr)
            sys.exit(stop.code)


def prepare_folder(cfg: DictConfig, ctx: RunContext, rank_zero: bool) -> bool:
    """Check and claim the run folder before anything is written to it; False when there is nothing
    to run (a completed run, or a refused job of a sweep)."""
    if not rank_zero:  # other ranks share rank zero's folder and leave it to rank zero
        return True
    try:
        if not ValidateBeforeRun.done(cfg):  # a sweep's job: its own values (a run: checked before Hydra made its folder)
            validate(cfg)  # every field (resume included) before the folder is read
        check_run_folder(cfg, ctx.run_dir)
        _claimed.append(claim(ctx.run_dir))  # held until the job ends (main), or with the process
    except AlreadyCompleted as e:
        log.info("%s", e)
        print(str(e), file=sys.stderr)
        return False
    except UserError as e:  # RunFolderError included
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        if ctx.multirun:  # the sweep goes on; its summary lists this job as refused and exits non-zero
            note_refusal(ctx.run_dir, str(e))
            return False
        sys.exit(2)
    save_hydra_files(cfg, ctx.run_dir)
    return True


_claimed: list = []


_watching: list = []  # (a list, not a flag: a sweep's launcher pickles this module's main by value)


def watch_launcher(parent: int, getppid=os.getppid, stop=None, poll: float = 1.0):
    """In a process that a sweep's launcher started for its jobs (joblib's loky workers), a daemon
    thread that stops the job as SIGTERM would (checkpoint saved, run recorded as interrupted)
    once the launching process ``parent`` is gone; ``main`` then ends the worker, which releases
    the job folder's lock: a killed sweep leaves no worker training on or holding a folder. The
    thread."""
    import threading

    stop = stop or (lambda: os.kill(os.getpid(), signal.SIGTERM))

    def watch() -> None:
        while getppid() == parent:
            time.sleep(poll)
        log.error("the sweep's launching process (%d) has ended: this job stops (resume=auto continues it)", parent)
        thread.launcher_gone = True
        stop()

    thread = threading.Thread(target=watch, name="lipvae-launcher-watch", daemon=True)
    thread.launcher_gone = False
    thread.start()
    return thread


class Refused(BaseException):
    """A ``UserError`` out of a Hydra callback (Hydra turns an ``Exception`` there into a warning)."""


class ValidateBeforeRun(HydraCallback):
    """A single run's config is checked once, as Hydra hands it over and before Hydra makes the
    run folder (a Hydra callback, ``hydra.callbacks.validate``): a bad value writes nothing.
    ``done(cfg)``: whether this process checked that config already (the job then does not).
    A sweep's jobs each check their own config (``prepare_folder``)."""

    _checked: list = []  # the YAML of the configs this process checked

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(task)
        except UserError as e:
            raise Refused(e) from None
        ValidateBeforeRun._checked.append(OmegaConf.to_yaml(task))

    @classmethod
    def done(cls, cfg: DictConfig) -> bool:
        return bool(cls._checked) and OmegaConf.to_yaml(cfg) in cls._checked


@hydra.main(version_base="1.3", config_path="pkg://lipvae.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()  # again here: a sweep's worker processes start without cli()'s filters
    import multiprocessing

    if multiprocessing.current_process().name.startswith("LokyProcess") and not _watching:
        _watching.append(watch_launcher(os.getppid()))  # once per worker: it runs several jobs
    ctx = RunContext.from_hydra()
    rank_zero = not _other_rank()
    if not prepare_folder(cfg, ctx, rank_zero):
        return None
    results = None
    try:
        with recorded(cfg, ctx, rank_zero):
            results = run(cfg, ctx)
    finally:
        if _watching and _watching[0].launcher_gone:  # nobody waits for this worker: end it, releasing the job's lock
            logging.shutdown()
            os._exit(128 + signal.SIGTERM)
        while _claimed:  # the folder is free for the next command (a sweep's worker: its next job's)
            release(_claimed.pop())
    return None if results is None else objective_value(results, cfg.objective, cfg.get("likelihood_floor"))


def objective_value(results: Results, objective, likelihood_floor: float | None = None) -> float | list[float]:
    """What ``objective`` names (``lipvae.results.OBJECTIVES``), read from the run's results: a
    number, or a list of them for a list of names; NaN where the run has no such value.
    ``certified_mean_above_floor`` is -inf for a model whose test log-likelihood is below
    ``likelihood_floor``."""
    from lipvae.results import OBJECTIVES

    def one(name: str) -> float:
        value = results.get(*OBJECTIVES[name])
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        if name == "certified_mean_above_floor" and likelihood_floor is not None:
            ll = results.get("metrics", "test_log_likelihood")
            if not isinstance(ll, (int, float)) or ll < likelihood_floor:
                return -math.inf
        return value

    if isinstance(objective, str):
        return one(objective)
    return [one(name) for name in objective]


def _multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def _elsewhere(argv: list[str]) -> bool:
    """A sweep whose jobs a launcher runs on other machines (SLURM: hydra/launcher=slurm or
    submitit_slurm): the device is checked in each job, where it runs, not on the login node."""
    return _multirun(argv) and any(a.startswith("hydra/launcher=") and "slurm" in a for a in argv)


def check_folder_names(argv: list[str]) -> None:
    """A run or sweep folder given on the command line whose name has a component longer than
    file systems allow (255 bytes) is one line, before Hydra tries to make it."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "--config-dir"):
            longest = max((len(part.encode()) for part in Path(value).parts), default=0)
            if longest > 255:
                raise UserError(f"{key.lstrip('+~')}: got a folder name of {longest} bytes; accepted: folder names of"
                                " at most 255 bytes each")


def cli() -> None:
    """``python -m lipvae.train``: the command line is read (one line on a mistake, exit 2), Hydra
    composes the config once, and it is checked once before anything is written
    (``ValidateBeforeRun``; a sweep's shared fields here, each job's own in the job)."""
    quiet_third_party()
    # Hydra's argparse takes the overrides as one run of positionals: `a=1 -m b=2` left b=2
    # unrecognised. -m/--multirun may stand anywhere on lipvae's command line
    flags = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]
    # a single value where a list is meant (certify.r=8) is that list ([8]), for Hydra too
    sys.argv[1:] = flags + [as_list_where_meant(a) for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    argv = sys.argv[1:]
    plain = not any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv)  # no other Hydra flag
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors come here, to be said in one line
    try:
        check_folder_names(argv)
        check_yaml_files(argv)
        if plain:
            parse_overrides([a for a in argv if a not in flags])  # an override Hydra cannot read
        if plain and _multirun(argv):
            # a sweep's keys and first values compose before any job (Hydra composes each job's
            # alone); what every job shares is checked here, once, each value by its own job
            check_overrides(argv)
            validate(check_overrides(argv, sweeps="drop"), machine=not _elsewhere(argv))
        try:
            main()
        except ConfigCompositionException as e:  # MissingConfigException included
            GlobalHydra.instance().clear()
            texts = [a for a in argv if "=" in a and not a.startswith("-")]  # the overrides, not the flags
            try:
                overrides = [o for o, _ in parse_overrides(texts)]
            except UserError:
                overrides = texts
            raise composition_error(e, overrides, compose_config) from None
        except InstantiationException as e:  # a Hydra callback of lipvae's refused its arguments
            if isinstance(e.__cause__, UserError):
                raise e.__cause__ from None
            raise
    except (UserError, Refused) as e:
        print(f"error: {e.args[0] if isinstance(e, Refused) else e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # where Hydra itself makes the run folder or reads --config-dir
        if e.errno != errno.ENAMETOOLONG:
            raise
        print(f"error: hydra.run.dir: a folder name is longer than the file system allows ({e.strerror}: "
              f"{str(e.filename)[:80]}...); accepted: names of at most 255 bytes per folder", file=sys.stderr)
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


if __name__ == "__main__":  # the command runs the module's importable copy, which Hydra's callbacks name
    from lipvae.train import cli as _cli

    _cli()
