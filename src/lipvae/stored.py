"""A finished run's files read back: its weights (loaded safely), its config and its model."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lipvae.build import build_vae
from lipvae.compose import hydra_compose
from lipvae.errors import UserError
from lipvae.results import FROZEN_MODEL, RunFolder, check_record_version
from lipvae.safety import check_entries, check_targets, read_regular, targets_in, targets_in_folder
from lipvae.vae import stored_input_shape

log = logging.getLogger("lipvae")

FROZEN = FROZEN_MODEL  # the name of a run's frozen weights (lipvae.results.RunFolder)


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"checkpoint: cannot load {path} safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint (the whole dict: weights, epoch, loops), never executing code from
    the file; one line when it cannot be loaded safely or is not a Lightning checkpoint."""
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "epoch" not in ckpt:
        raise UserError(f"checkpoint: {path} is not a Lightning checkpoint (a plain state dict?); resume needs the"
                        " run's own checkpoints/last.ckpt, or drop resume=true to start afresh")
    return ckpt


def load_best_weights(vae, best: str | Path | None, epochs: int, what: str = "evaluating") -> int:
    """Load the VAE weights of the best checkpoint ``best`` (a ModelCheckpoint's
    ``best_model_path``, saved from a module holding the VAE as ``module.vae``; nothing when empty
    or missing) into ``vae``; the 1-based epoch whose weights it now holds (``epochs``, the epochs
    trained, when nothing was loaded). ``what``: the log line's verb."""
    if not best or not Path(best).is_file():
        return epochs
    state = load_checkpoint(Path(best))
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in state["state_dict"].items() if k.startswith("vae.")})
    epoch = int(state["epoch"]) + 1
    log.info("%s the best epoch (%d of %d): %s", what, epoch, epochs, best)
    return epoch


def load_state(path: Path) -> dict:
    """A state dict from a file, never executing code from it (``weights_only=True``)."""
    state = _load(path)
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        state = {k.removeprefix("vae."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict):
        raise UserError(f"checkpoint: {path} holds a {type(state).__name__}, not a state dict")
    return state


def locate(path: Path) -> tuple[Path, Path]:
    """The run folder and the weights file of a run folder or a checkpoint inside one."""
    path = Path(path)
    if path.is_dir():
        run_dir, weights = path, RunFolder(path).frozen_model
    elif path.is_file():
        weights = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise UserError(f"run: {path} does not exist; give a run folder or a checkpoint file")
    check_entries(run_dir)  # a symlink or special file among its entries: refused before anything is read
    if not RunFolder(run_dir).config_file.is_file():
        if run_dir.parent.name == "evaluations":  # one of a run's re-evaluations, not the run
            raise UserError(f"run: {run_dir} is an evaluation of the run {run_dir.parent.parent}; give that run")
        raise UserError(f"run: {run_dir} has no .hydra/config.yaml; is it a lipvae run folder?")
    check_record_version(run_dir, "evaluate")
    if not weights.is_file():
        raise UserError(f"run: {weights} is missing; the run did not finish, certify one of its checkpoints/")
    return run_dir, weights


#: the config groups a recorded run's choices are read for (experiment and variant presets only
#: set fields of these, which the recorded config holds already)
_GROUPS = ("data", "module", "model", "trainer", "logger", "certify", "attack", "margins", "callbacks", "model/layer",
           "margins/latent")

def complete_config(run_dir: Path, cfg: DictConfig, defaults: DictConfig | dict | None = None) -> DictConfig:
    """A recorded run's config over today's defaults for the same group choices (a choice that
    no longer exists: the group's default), so that a config recorded without some entries (a
    run trained from Python) is a whole one. ``defaults``: that composition when the caller has
    made it already (``run_choices`` plus its own overrides)."""
    from hydra.core.global_hydra import GlobalHydra

    if defaults is None:  # inside another Hydra app its context stays, and nothing is composed
        defaults = {} if GlobalHydra.instance().is_initialized() else _defaults(tuple(run_choices(run_dir)))
    base = OmegaConf.create(OmegaConf.to_container(defaults) if isinstance(defaults, DictConfig) else defaults)
    return OmegaConf.merge(base, cfg)  # an entry the run set to null stays null


def run_choices(run_dir: Path) -> list[str]:
    """The run's config-group choices (``attack=pgd`` …) that today's configs still have, from
    its ``.hydra/hydra.yaml`` (none for a run made without Hydra: the groups' defaults)."""
    hydra_file = RunFolder(run_dir).hydra_file
    if not hydra_file.is_file() and not hydra_file.is_symlink():
        return []
    choices = OmegaConf.select(load_config(hydra_file), "hydra.runtime.choices") or {}
    if not isinstance(choices, DictConfig):
        raise UserError(f"config: {hydra_file} has hydra.runtime.choices of another kind than a mapping")
    return [f"{group}={choices[group]}" for group in _GROUPS
            if choices.get(group) and (_CONF / group / f"{choices[group]}.yaml").is_file()]


_CONF = Path(str(resources.files("lipvae.conf")))  # conf/ of the repository, or of the installed wheel


def _defaults(overrides: tuple[str, ...]) -> dict:
    """Today's composed default config for these group choices, as a plain container (composed
    once per process by ``hydra_compose``: a re-evaluation completes both the run's config and its
    stored one); {} where today's configs cannot combine them (the recorded config is then used
    as it is)."""
    try:
        return OmegaConf.to_container(hydra_compose("lipvae.conf", "config", overrides))
    except Exception:
        return {}


def input_shape_of(state: dict, weights: Path) -> tuple:
    """The input shape a VAE's weights were trained for (kept in its state dict); one line for
    weights saved before lipvae kept it."""
    shape = stored_input_shape(state)
    if shape is None:
        raise UserError(f"checkpoint: {weights} holds no input shape (saved by an older lipvae); train the run again"
                        " or use the lipvae that saved it")
    return shape


def load_config(path: Path) -> DictConfig:
    """A run's stored config (or ``.hydra/hydra.yaml``), read as data: a regular file only (no
    symlink, FIFO or device; ``lipvae.safety.read_regular``), parsed by OmegaConf's safe YAML
    loader (a ``!!python`` tag is an error, never an object); one line when it is missing, not
    a plain file or not valid YAML."""
    import yaml

    try:
        cfg = OmegaConf.create(read_regular(path))
    except FileNotFoundError:
        raise UserError(f"config: {path} does not exist; is this a lipvae run folder?") from None
    except PermissionError as e:
        raise UserError(f"config: cannot read {path} ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        from lipvae.compose import yaml_problem

        raise UserError(f"config: {path} is not valid YAML ({yaml_problem(e)})") from None
    except Exception as e:  # OmegaConf's own parse errors (a key it cannot hold, ...)
        raise UserError(f"config: {path} cannot be read as a config ({type(e).__name__})") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"config: {path} holds a {type(cfg).__name__}, not a config mapping")
    return cfg


def check_stored_targets(cfg: DictConfig, source: Path, given: DictConfig | None = None,
                         config_dirs: tuple = ()) -> DictConfig:
    """``cfg`` resolved into plain values, once no ``_target_`` in it falls outside what lipvae
    builds from a stored run (``lipvae.safety.check_targets``): its own classes, and those of
    ``given`` (the config this process composed from the user's command line) and of every YAML
    file in the user's ``config_dirs``. One line naming the field otherwise; nothing runs."""
    plain = OmegaConf.to_container(resolved(cfg, source))
    trusted = targets_in(OmegaConf.to_container(given, resolve=False)) if given is not None else set()
    for folder in config_dirs:
        trusted |= targets_in_folder(Path(folder))
    check_targets(plain, source, trusted)
    return OmegaConf.create(plain)


def resolved(cfg: DictConfig, source: Path) -> DictConfig:
    """``cfg`` with its interpolations resolved into plain values; one line when they cannot be."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:
        raise UserError(f"config: {source} cannot be resolved ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None


def load_model(path: Path, cfg: DictConfig | None = None):
    """The frozen VAE of a run (or of one of its checkpoints) and the run's config (completed by
    ``complete_config`` where it was recorded by an older lipvae; ``cfg``: that config, when the
    caller has it already)."""
    run_dir, weights = locate(path)
    if cfg is None:
        source = RunFolder(run_dir).config_file
        cfg = check_stored_targets(complete_config(run_dir, load_config(source)), source)
    state = load_state(weights)
    broken = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
              and not bool(torch.isfinite(v).all())]
    if broken:
        raise UserError(f"checkpoint: {weights} holds non-finite weights ({', '.join(broken[:3])}); no certificate or"
                        " attack means anything for it: train the run again")
    vae = build_vae(cfg.model, input_shape_of(state, weights))
    vae.to(next((v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()),
                torch.float32))  # the dtype it was trained in (trainer.precision=64-true: float64)
    frozen = weights.name == FROZEN
    if frozen:
        vae.freeze()
    try:
        vae.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint: {weights} does not fit the run's model config ({str(e).splitlines()[0][:200]})"
        ) from None
    if not frozen:
        vae.freeze()
    return vae.eval(), cfg, run_dir


def recorded_data(run_dir: Path) -> dict:
    """The ``data`` record of a run's results.json ({} where there is none or it cannot be read)."""
    from lipvae.results import Results, ResultsError

    try:
        record = Results.read(run_dir).data
    except ResultsError:
        return {}
    return record if isinstance(record, dict) else {}


def warn_unchecked_data(run_dir: Path, record: dict) -> None:
    """One line, in the log and on stderr: this run's data cannot be checked."""
    import sys

    what = "no results.json" if not record else "no digests of its data (recorded by an older lipvae)"
    message = (f"warning: {run_dir} has {what}: the re-evaluation cannot check that it tests on the images the"
               " run was trained on; a changed or moved data file would go unnoticed")
    log.warning("%s", message.removeprefix("warning: "))
    print(message, file=sys.stderr)


def _recorded_location(data: DictConfig, record: dict, trained: DictConfig) -> None:
    """A run trained on a relative ``data.path``/``data.root`` is re-evaluated from another
    folder: where the run's own (``trained``, not overridden) relative location is not found from
    here, the absolute one its record holds is read instead (and checked against its digests as
    always)."""
    folder = record.get("folder")
    trained = trained.get("data") or {}
    for key in ("path", "root"):
        given = data.get(key)
        if (isinstance(given, str) and given == trained.get(key) and not Path(given).expanduser().is_absolute()
                and not Path(given).expanduser().exists() and isinstance(folder, str) and Path(folder).exists()):
            log.info("data.%s: %s is not found from %s; reading the run's recorded %s", key, given, Path.cwd(), folder)
            data[key] = folder


def rebuild_data(run_dir: Path, cfg: DictConfig):
    """The data module of a finished run with the split it was trained on, rebuilt from its
    record, never from today's defaults or environment: the recorded kind of split (official
    or resplit-test) and the seed that divided it (the run's own, whatever ``seed=`` a
    re-evaluation sets for its attack), checked against the recorded file and index digests.
    ``cfg.data`` may still point elsewhere for the files (``data.root``). One line when the
    split cannot be rebuilt exactly."""
    from lipvae.build import build_datamodule

    record = recorded_data(run_dir)
    seed = record.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool)) and seed is not None:
        raise UserError(f"data.seed: {run_dir}/results.json records {str(seed)[:40]!r}; accepted: an integer"
                        " (the record is damaged: re-run the training)")
    trained = load_config(RunFolder(run_dir).config_file)  # the run's own config, as it was trained
    if seed is None:  # recorded before the field existed: the seed the run was trained with
        seed = trained.get("seed", cfg.seed)
    if not (record.get("sources") and record.get("indices")):
        warn_unchecked_data(run_dir, record)
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    _recorded_location(data, record, trained)
    if record.get("split") in ("official", "resplit-test"):
        data.resplit = record["split"] == "resplit-test"
    dm = build_datamodule(data, int(seed))
    dm.setup()
    if record:
        dm.info.check_same(record, run_dir)
    return dm
