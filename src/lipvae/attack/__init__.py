"""Attacks on VAEs and estimated robustness margins (docs/math.md §4). Torch only, no Hydra.

- ``base``: damage, the Monte Carlo robustness test, ``MarginAttack`` (what an attack of the
  ``attack`` config group subclasses), the resumable search state;
- ``pgd``: lipvae's batched attack (``attack=pgd``);
- ``lbfgs``: the reference procedure (``attack=lbfgs``);
- ``latent``: the latent-space attack (``margins/latent=hard|soft``).
"""

from lipvae.attack.base import AttackResult, MarginAttack, SearchState, damage, robust_probability
from lipvae.attack.latent import LatentAttack, gaussian_kl, latent_space_attack
from lipvae.attack.lbfgs import LBFGS_DEFAULTS, LBFGSAttack, lbfgs_margins, lbfgs_max_damage
from lipvae.attack.pgd import PGDAttack, estimate_margins, max_damage_attack, project_ball_box, projected_gradient

__all__ = [
    "AttackResult", "MarginAttack", "SearchState", "damage", "robust_probability",
    "LatentAttack", "gaussian_kl", "latent_space_attack",
    "LBFGS_DEFAULTS", "LBFGSAttack", "lbfgs_margins", "lbfgs_max_damage",
    "PGDAttack", "estimate_margins", "max_damage_attack", "project_ball_box", "projected_gradient",
]
