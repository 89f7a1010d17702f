"""``python -m lipvae.evaluate``: the evaluation pipeline (``lipvae.evaluation``) run again on
a finished run with other certificate or attack settings:

    python -m lipvae.evaluate <run folder> [certify.*=... attack.*=... seed=...] [--replace] [--fresh]

Without ``--replace`` the new evaluation goes to ``<run>/evaluations/<time>/`` (evaluation.json,
its tables and figures) and the run's own results are left as they were. With ``--replace`` it
becomes the run's evaluation: results.json's ``certified``, ``estimated``, ``latent_attack`` and
``soundness_violations`` are rewritten together, after the files they replace are copied to
``<run>/evaluations/<time>-replaced/``. Either way the evaluation runs in its own folder first,
so a stop midway leaves the run's files as they were; a replacement is staged whole beside the
run and switched in by renames alone, so a full disk leaves the run exactly as it was. When the attack's settings are those of the stored
evaluation, its estimated margins are reused (the soundness check is redone against the new
certificates); ``--fresh`` attacks again regardless.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from lipvae.certify.certificates import check_lipschitz
from lipvae.compose import check_yaml_files
from lipvae.errors import NO_SPACE, UserError, command, signals_stop
from lipvae.evaluation import MARGINS_TABLE, OUTPUTS, check_radii, evaluate, write_evaluation
from lipvae.logs import interactive, quiet_third_party
from lipvae.results import RESULTS_FILE, Results, ResultsError, RunFolder, atomic_write_text, code_version

log = logging.getLogger("lipvae")


# --- re-evaluating a finished run ------------------------------------------------------------

#: what a re-evaluation may change: the model and the data are the run's (``data.root`` and
#: ``data.path`` only say where its files are now: they are checked against the recorded digests)
CHANGEABLE = ("certify.", "attack", "margins", "seed", "data.root", "data.path")


def reevaluation_config(run_dir: Path, overrides: list[str], changeable: tuple[str, ...] = CHANGEABLE,
                        config_dirs: tuple = ()) -> DictConfig:
    """The run's config (``complete_config``) with ``overrides`` applied, read and typed by Hydra's
    own composition, as training reads its command line (the same one-line errors): the packaged
    config is composed once, with the run's group choices and the overrides, and the overridden
    fields (a group's whole node for ``attack=lbfgs``) replace the run's. Only ``changeable``
    fields may change: the model and the data are the run's. ``config_dirs``: the user's config
    folders (``--config-dir``), for options of their own (``attack=random``)."""
    from lipvae.compose import compose_config, parse_overrides
    from lipvae.stored import check_stored_targets, complete_config, load_config, resolved, run_choices

    parsed = parse_overrides(overrides, sweeps="refuse")
    accepted = ", ".join(f"{c}*" if c.endswith(".") else f"{c}, {c}.*" if c in ("attack", "margins") else c
                         for c in changeable)
    for text, o in parsed:
        key = o.key_or_group
        if not key.startswith(changeable):
            raise UserError(f"{key}: cannot change in a re-evaluation; accepted: {accepted} "
                            f"(the model and data are the run's: train a new run for those)")
        if o.is_add() or o.is_delete() or o.is_force_add():
            raise UserError(f"{text}: only key=value (fields are neither added nor removed in a re-evaluation)")
    groups = {o.key_or_group for _, o in parsed if o.key_or_group in ("attack", "margins/latent")}
    base = [c for c in run_choices(run_dir) if c.split("=", 1)[0] not in groups]
    composed = compose_config(base + [text for text, _ in parsed], config_dirs=config_dirs)
    source = RunFolder(run_dir).config_file
    cfg = resolved(complete_config(run_dir, load_config(source), defaults=composed), source)
    order = {"attack": 0, "margins/latent": 1}  # a group's node first, then the fields set in it
    for _, o in sorted(parsed, key=lambda p: order.get(p[1].key_or_group, 2)):
        key = o.key_or_group.replace("/", ".")
        value = OmegaConf.select(composed, key)
        if isinstance(value, DictConfig):
            value = OmegaConf.create(OmegaConf.to_container(value, resolve=True))
        OmegaConf.update(cfg, key, value, merge=False)
    # the run's files are data: no target beyond lipvae's own and the user's is ever built
    return check_stored_targets(cfg, source, given=composed, config_dirs=config_dirs)


def _reusable(stored: Results | None, cfg: DictConfig, run_dir: Path) -> tuple[pd.DataFrame | None, dict | None]:
    """The stored margins table (and latent-attack summary), when they were made with the attack
    settings and seed asked for now; (None, None) otherwise."""
    if not stored or not stored.estimated or not (run_dir / MARGINS_TABLE).is_file():
        return None, None
    from lipvae.stored import complete_config

    # completed the way the run's config is, so that fields added since it ran compare equal
    try:
        old = OmegaConf.to_container(complete_config(run_dir, OmegaConf.create(stored.config or {})), resolve=True)
    except Exception as e:  # a hand-edited or foreign record: evaluate afresh rather than fail
        log.warning("%s: the recorded config cannot be completed (%s); attacking again", run_dir, type(e).__name__)
        return None, None
    old_attack, new_attack = dict(old.get("attack") or {}), OmegaConf.to_container(cfg.attack, resolve=True)
    old_margins, new_margins = dict(old.get("margins") or {}), OmegaConf.to_container(cfg.margins, resolve=True)

    def core(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k != "compile"}  # compiling changes the speed, not the search

    if core(old_attack) != core(new_attack) or old.get("seed") != cfg.seed \
            or old_margins.get("attacked_inputs") != new_margins.get("attacked_inputs"):
        return None, None
    try:
        table = pd.read_csv(run_dir / MARGINS_TABLE)
    except (OSError, ValueError) as e:
        log.warning("%s: %s cannot be read (%s); attacking again", run_dir, MARGINS_TABLE, type(e).__name__)
        return None, None
    if not {"index", "label", "estimated", "censored"} <= set(table.columns):
        log.warning("%s: %s lacks the columns of an estimated-margin table; attacking again", run_dir, MARGINS_TABLE)
        return None, None
    latent = stored.latent_attack if old_margins.get("latent") == new_margins.get("latent") else None
    return table, latent


def _stored_record(run_dir: Path) -> Results | None:
    """The run's results.json, or None (with one log line) when it is missing, unreadable or not
    a record this lipvae can reuse: the evaluation then attacks afresh."""
    folder = RunFolder(run_dir)
    if not folder.results_file.is_file():
        return None
    try:
        stored = folder.results()
    except ResultsError as e:
        log.warning("%s: %s; nothing of it is reused", run_dir, e)
        return None
    parts = ("config", "estimated", "certified", "latent_attack")
    if any(stored.get(k) is not None and not isinstance(stored.get(k), dict) for k in parts):
        log.warning("%s: results.json is not a record of this lipvae's schema; nothing of it is reused", run_dir)
        return None
    return stored


def reevaluate(path: Path, overrides: list[str], replace: bool = False, fresh: bool = False,
               progress: bool = True, changeable: tuple[str, ...] = CHANGEABLE,
               certificates: bool = False, config_dirs: tuple = ()) -> tuple[Path, dict]:
    """Run the evaluation pipeline again on a finished run; returns where it was written and
    the evaluation's part of the results. ``changeable``: the fields the overrides may set;
    ``certificates``: refuse a run that has none to recompute (a standard VAE); ``config_dirs``:
    config folders of the user's own (``--config-dir``)."""
    from lipvae.stored import FROZEN, load_model, locate
    from lipvae.config import validate
    from lipvae.runfolder import RunFolderError, claim, release

    run_dir, weights = locate(Path(path))
    cfg = reevaluation_config(run_dir, overrides, changeable, config_dirs)
    validate(cfg)  # before the model is loaded: a bad value costs nothing
    if certificates and (cfg.model.kind != "lipschitz" or not cfg.margins.certify):
        raise UserError(f"run: {run_dir} has no certificates to recompute (model.kind={cfg.model.kind}, "
                        f"margins.certify={cfg.margins.certify}); only Lipschitz VAEs have them")
    vae, cfg, run_dir = load_model(Path(path), cfg)
    check_radii(cfg, vae.input_shape, vae.kind == "lipschitz")
    stored = _stored_record(run_dir)
    if replace and weights.name != FROZEN:
        raise UserError(f"--replace: {weights} is a checkpoint, not the run's evaluated model; drop --replace")
    if replace and (stored is None or stored.status != "completed"):
        raise UserError(f"--replace: {run_dir} holds no completed run to replace the evaluation of; drop --replace")
    if weights.name != FROZEN:
        stored = None  # the stored margins belong to the frozen model, not to this checkpoint
    evaluations = RunFolder(run_dir).evaluations
    evaluations_existed = evaluations.exists()
    made: list[Path] = []  # folders this evaluation created: removed again if the disk fills up
    lock = None
    try:
        lock = claim(run_dir, hint="(its training, or another evaluation of it); run this one when it has finished")
        finish_switch(run_dir)
        stored = _stored_record(run_dir) if stored is not None else None  # as the finished switch left it
        return _reevaluate(vae, cfg, run_dir, weights, stored, overrides, replace, fresh, progress, made)
    except RunFolderError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        if not evaluations_existed:
            shutil.rmtree(evaluations, ignore_errors=True)
        raise UserError(f"no space left on the device while evaluating {run_dir} ({e.strerror}); the run is as it"
                        " was: free some space and run the command again") from None
    finally:
        if lock is not None:
            release(lock)


def _reevaluate(vae, cfg, run_dir, weights, stored, overrides, replace, fresh, progress, made):
    from lipvae.stored import rebuild_data

    stamp = time.strftime("%Y%m%d-%H%M%S")
    # always evaluated into a folder of its own first: a stop midway leaves the run as it was
    out_dir = _new_folder(RunFolder(run_dir).evaluations / stamp)
    made.append(out_dir)
    reuse, reuse_latent = (None, None) if fresh else _reusable(stored, cfg, run_dir)
    if reuse is None:
        reuse_latent = None  # a new attack draws the latent attack anew too
    if reuse_latent is not None and (run_dir / "latent_attack.png").is_file():
        shutil.copy2(run_dir / "latent_attack.png", out_dir / "latent_attack.png")
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    vae = vae.to(device)
    check_lipschitz(vae.lipschitz_constants())
    test = rebuild_data(run_dir, cfg).split("test")  # the run's own split; seed= seeds only the attack
    start = time.perf_counter()
    try:
        ev = evaluate(vae, test, cfg, out_dir, cfg.seed, progress=progress, reuse=reuse, reuse_latent=reuse_latent)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    part = ev.results()
    record = {
        "overrides": list(overrides),
        "at": stamp,
        "code": code_version(),
        "reused_estimated_margins": reuse is not None,
        "timings": ev.timings(time.perf_counter() - start),
    }
    body = {"run": str(run_dir), "weights": weights.name, **record, **part,
            "config": {"certify": OmegaConf.to_container(cfg.certify), "attack": OmegaConf.to_container(cfg.attack),
                       "margins": OmegaConf.to_container(cfg.margins), "seed": cfg.seed}}
    write_evaluation(out_dir, body)
    if not replace:
        return out_dir, part
    for name, value in part.items():  # the evaluation's parts, all together (Results.EVALUATION_PARTS)
        setattr(stored, name, value)
    stored.config = {**(stored.config or {}), "certify": OmegaConf.to_container(cfg.certify),
                     "attack": OmegaConf.to_container(cfg.attack), "margins": OmegaConf.to_container(cfg.margins)}
    kept = _new_folder(RunFolder(run_dir).evaluations / f"{stamp}-replaced")
    made.append(kept)
    stored.evaluation = {**record, "made_in": f"evaluations/{out_dir.name}", "replaced": f"evaluations/{kept.name}"}
    _switch_in(run_dir, out_dir, kept, stored, made)
    return run_dir, part


def _switch_in(run_dir: Path, new: Path, kept: Path, record: Results, made: list[Path]) -> None:
    """Make the evaluation in ``new`` the run's own, all or nothing: the files it replaces are
    copied to ``kept``, the new files and results.json are staged whole in a hidden folder beside
    them, and only then moved in by renames, which write no data (a full disk cannot stop them
    halfway, so the tables and results.json never disagree)."""
    for name in (*OUTPUTS, RESULTS_FILE):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, kept / name)
    staging = _new_folder(run_dir / f".replacing-{kept.name}")
    made.append(staging)
    for name in OUTPUTS:
        if (new / name).is_file():
            shutil.copy2(new / name, staging / name)
    record.write(staging)
    log.info("the evaluation being replaced is kept in %s", kept)
    # the journal: from here on the switch is rolled forward, by this process or, if it is
    # stopped between two renames, by the next command that claims the run (finish_switch)
    atomic_write_text(staging / SWITCH_READY, "".join(f"{n}\n" for n in OUTPUTS if (staging / n).is_file()))
    made.remove(staging)
    _roll_forward(run_dir, staging)


#: written in a staging folder once it holds the whole new evaluation: its switch may proceed
SWITCH_READY = "READY"


def _roll_forward(run_dir: Path, staging: Path) -> None:
    """Move a staged evaluation's files into the run (the old ones it did not make out), then
    its results.json last; each step may be repeated, so an interrupted switch can be finished."""
    made = set((staging / SWITCH_READY).read_text().split())  # the journal: what this evaluation made
    for name in OUTPUTS:
        if (staging / name).is_file():
            os.replace(staging / name, run_dir / name)
        elif name not in made:  # an old file this evaluation did not make (one it made has moved)
            (run_dir / name).unlink(missing_ok=True)
    if (staging / RESULTS_FILE).is_file():
        os.replace(staging / RESULTS_FILE, run_dir / RESULTS_FILE)
    (staging / SWITCH_READY).unlink(missing_ok=True)
    staging.rmdir()


def finish_switch(run_dir: Path) -> None:
    """Complete a ``--replace`` that was stopped between its renames (its staging folder holds the
    ``READY`` journal entry), or drop one stopped while it was being staged (nothing of it had
    moved). Called under the run's lock, before anything else reads the run."""
    for staging in sorted(Path(run_dir).glob(".replacing-*")):
        if not staging.is_dir() or staging.is_symlink():
            continue
        if (staging / SWITCH_READY).is_file():
            log.warning("%s: finishing the replacement of its evaluation that was stopped midway", run_dir)
            _roll_forward(run_dir, staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)


def _new_folder(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``… when it exists: an evaluation never lands on another."""
    candidate, k = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            k += 1
            candidate = path.with_name(f"{path.name}-{k}")


USAGE = ("python -m lipvae.evaluate <run folder> [certify.*=... attack=... attack.*=... margins.*=... seed=...] [--replace]"
         " [--fresh]"
         " [--config-dir DIR]")

HELP = f"""usage: {USAGE}

Run the evaluation pipeline again on a finished run: certify its test inputs, attack the first
margins.attacked_inputs of them, check every certificate against its estimated margin (soundness), and
write the tables, figures and evaluation.json into a new folder <run>/evaluations/<time>/.

arguments:
  <run folder>        a lipvae run folder (or a checkpoint inside one). Its files are read as data:
                      only lipvae's own classes, or yours given with --config-dir, are ever built.
  certify.*=...       the certificates: certify.r=[8] certify.p=[0.5] certify.forms=[tight,cantelli]
  attack=NAME         another attack (pgd, lbfgs, or one of yours with --config-dir); attack.*=...
                      its settings (attack.starts, attack.steps, attack.samples)
  margins.*=...       which inputs: margins.certified_inputs=N (null: the whole test split),
                      margins.attacked_inputs=N; margins.latent.budget=C (the latent attack's)
  seed=N              seeds the attack and the certifier (the run's data split stays its own)
  data.root=DIR       where a moved run's data now is (still checked against the recorded digests);
  data.path=FILE      data.path for a tensor-file run
  --replace           make this evaluation the run's own (results.json, tables, figures), the
                      replaced files kept under evaluations/<time>-replaced/
  --fresh             attack again even where the stored margins were made with the same settings
  --config-dir DIR    a folder of your own config groups (laid out as conf/)
  -h, --help          this help

exit status: 0 done, 2 bad input (one line naming the field), 130/143 interrupted (SIGINT/SIGTERM)"""


class HelpWanted(Exception):
    """``--help``: the text to print, exit status 0."""


def _flags(argv: list[str]) -> tuple[list[str], set[str], tuple[str, ...]]:
    """The arguments, the on/off flags and the ``--config-dir`` folders of the command line."""
    args, flags, dirs = [], set(), []
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            raise HelpWanted(HELP)
        if word in ("--config-dir", "-cd") or word.startswith("--config-dir="):
            folder = word.split("=", 1)[1] if "=" in word else next(words, "")
            check_yaml_files(["--config-dir", folder])  # an existing folder whose YAML files parse
            dirs.append(folder)
        elif word.startswith("-"):
            if word not in ("--replace", "--fresh"):
                raise UserError(f"unknown flag {word}; accepted: --replace, --fresh, --config-dir DIR\nusage: {USAGE}")
            flags.add(word)
        else:
            args.append(word)
    if not args:
        raise UserError(f"give a run folder\nusage: {USAGE}")
    return args, flags, tuple(dirs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    quiet_third_party()
    with signals_stop():  # SIGINT and SIGTERM stop an evaluation cleanly
        return _main(argv)


def _main(argv: list[str]) -> int:
    def run() -> int:
        try:
            args, flags, dirs = _flags(argv)
        except HelpWanted as e:
            print(e)
            return 0
        out, part = reevaluate(Path(args[0]), args[1:], replace="--replace" in flags, fresh="--fresh" in flags,
                               progress=interactive(), config_dirs=dirs)
        cert, est = part["certified"], part["estimated"]
        line = [f"evaluation written to {out}"]
        if cert:
            line.append(f"certified mean {cert['mean']:.4g}")
        if est:
            line.append(f"estimated mean {est['mean']:.4g}")
        if part["soundness_violations"] is not None:
            line.append(f"soundness violations {part['soundness_violations']}")
        print("; ".join(line))
        return 0

    try:
        return command(run, "copy the run somewhere writable first")
    except KeyboardInterrupt as e:
        print("error: interrupted; the run's own files are as they were (the partial evaluation is under "
              "its evaluations/; a replacement stopped midway is finished by the next command on the run)",
              file=sys.stderr)
        return 143 if str(e) == "SIGTERM" else 130  # 128 + the signal's number, as training exits


if __name__ == "__main__":
    sys.exit(main())
