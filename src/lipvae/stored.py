"""A finished run's files read back: its weights (loaded safely), its config and its model."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from lipvae.config import build_vae
from lipvae.errors import UserError

FROZEN = "frozen_model.pt"


def load_state(path: Path) -> dict:
    """A state dict from a file, never executing code from it (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"checkpoint: cannot load {path} safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        state = {k.removeprefix("vae."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict):
        raise UserError(f"checkpoint: {path} holds a {type(state).__name__}, not a state dict")
    return state


def locate(path: Path) -> tuple[Path, Path]:
    """The run folder and the weights file of a run folder or a checkpoint inside one."""
    path = Path(path)
    if path.is_dir():
        run_dir, weights = path, path / FROZEN
    elif path.is_file():
        weights = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise UserError(f"run: {path} does not exist; give a run folder or a checkpoint file")
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise UserError(f"run: {run_dir} has no .hydra/config.yaml; is it a lipvae run folder?")
    if not weights.is_file():
        raise UserError(f"run: {weights} is missing; the run did not finish, certify one of its checkpoints/")
    return run_dir, weights


def load_model(path: Path):
    """The frozen VAE of a run (or of one of its checkpoints) and the run's config."""
    run_dir, weights = locate(path)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    vae = build_vae(cfg.model)
    state = load_state(weights)
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
