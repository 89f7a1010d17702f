"""README, "Extending": a new Lipschitz layer and a new attack, each one class plus one YAML file
in a config folder of one's own, chosen like the built-in options and used by the whole pipeline."""

import math
import shutil

import pandas as pd
import pytest
import torch

from conftest import CONF, composed
from lipvae.attack import AttackResult, MarginAttack, robust_probability
from lipvae.build import build_attack, build_vae
from lipvae.config import validate
from lipvae.data import TensorBatches
from lipvae.evaluation import evaluate
from lipvae.networks import LipschitzLinear


class SpectralLinear(LipschitzLinear):
    """The weight divided by its exact spectral norm (when above 1): ‖W/max(1, ‖W‖₂)‖₂ ≤ 1."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, init_gain: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.weight = torch.nn.Parameter(init_gain * torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features))

    def effective_weight(self) -> torch.Tensor:
        return self.weight / torch.linalg.matrix_norm(self.weight, ord=2).clamp_min(1.0)


class RandomDirectionAttack(MarginAttack):
    """A deliberately plain attack: on a descending grid of radii, ``starts`` random directions
    at full radius; the margin is the smallest radius at which one of them breaks (r, p)."""

    name = "random_directions"

    def __init__(self, r: float, p: float, samples: int, starts: int, max_radius: float, pixel_range: bool,
                 grid_step: float) -> None:
        super().__init__(r, p, samples, starts, max_radius, pixel_range)
        self.grid_step = grid_step

    def estimate(self, vae, x, generator, seed=0, progress=True, state_path=None) -> AttackResult:
        n = len(x)
        margin = torch.full((n,), self.max_radius, dtype=x.dtype)
        censored = torch.ones(n, dtype=torch.bool)
        radii = [self.grid_step * k for k in range(round(self.max_radius / self.grid_step), 0, -1)]
        for t in radii:
            d = torch.randn(n, self.starts, x.shape[1], generator=generator, dtype=x.dtype)
            d = t * d / d.norm(dim=-1, keepdim=True)
            broken = (robust_probability(vae, x, d, self.r, self.samples, generator) <= self.p).any(dim=1)
            margin = torch.where(broken, torch.full_like(margin, t), margin)
            censored &= ~broken
        return AttackResult(margin, censored, len(radii))


@pytest.fixture
def my_conf(tmp_path):
    """The project's config folder plus the two YAML files a user would write."""
    conf = shutil.copytree(CONF, tmp_path / "conf")
    (conf / "model" / "layer" / "spectral.yaml").write_text(
        f"_target_: {__name__}.SpectralLinear\n_partial_: true\ninit_gain: 3.0\n")
    (conf / "attack" / "random.yaml").write_text(
        f"defaults:\n  - base/common@_here_\n  - _self_\n\n_target_: {__name__}.RandomDirectionAttack\ngrid_step: 0.25\n")
    return conf


def test_a_new_layer_is_one_class_and_one_yaml_file(my_conf):
    cfg = composed("model/layer=spectral", "model.hidden=[16,16]", "model.latent_dim=4", "enc_L=3", "dec_L=2",
                   conf=my_conf)
    validate(cfg)
    vae = build_vae(cfg.model, (1, 28, 28))
    layers = [m for m in vae.modules() if isinstance(m, LipschitzLinear)]
    assert len(layers) == 9 and all(type(m) is SpectralLinear for m in layers)
    # the initial weights have spectral norms near 3 (init_gain): the layer's own rescaling holds
    assert max(torch.linalg.matrix_norm(m.weight, ord=2).item() for m in layers) > 2
    constants = vae.lipschitz_constants()
    assert constants["measured"]["decoder"] <= 2.0 * 0.25 * (1 + 1e-6)  # its sigmoid head's ¼ included
    assert constants["measured"]["encoder_mean"] <= 3.0 * (1 + 1e-6)
    # sound: no pair of inputs is stretched by more than the measured constant
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g) * 1e-2
    with torch.no_grad():
        ratio = ((vae.decode(a + b) - vae.decode(a)).norm(dim=1) / b.norm(dim=1)).max().item()
    assert ratio <= constants["measured"]["decoder"] * (1 + 1e-5)
    x = torch.rand(3, 784, generator=g)
    before = vae.reconstruct(x, sample=False)
    vae.freeze()  # frozen through the base class: plain layers, the same function
    assert not any(isinstance(m, LipschitzLinear) for m in vae.modules())
    assert torch.allclose(vae.reconstruct(x, sample=False), before, atol=1e-6)


@pytest.mark.slow
def test_a_new_attack_is_one_class_and_one_yaml_file(my_conf, tmp_path):
    cfg = composed("attack=random", "tier=smoke", "model.hidden=[16,16]", "model.latent_dim=4",
                   "margins.attacked_inputs=4", "attack.starts=3", "attack.max_radius=3.0", "certify.r=[8.0]", conf=my_conf)
    validate(cfg)
    attack = build_attack(cfg.attack)
    assert type(attack) is RandomDirectionAttack
    assert (attack.starts, attack.grid_step, attack.max_radius, attack.samples) == (3, 0.25, 3.0, 20)
    torch.manual_seed(0)
    vae = build_vae(cfg.model, (1, 28, 28)).freeze().eval()
    g = torch.Generator().manual_seed(1)
    test = TensorBatches(torch.rand(8, 784, generator=g), torch.arange(8) % 10, torch.arange(8))
    ev = evaluate(vae, test, cfg, tmp_path, seed=0, progress=False)
    assert ev.estimated["method"] == "random_directions" and ev.estimated["num_inputs"] == 4
    margins = pd.read_csv(tmp_path / "margins.csv")
    on_grid = (margins["estimated"] / 0.25).round() * 0.25
    assert len(margins) == 4 and (margins["estimated"] - on_grid).abs().max() < 1e-9  # this attack's grid
    assert ev.soundness_violations == len(margins[margins["certified_tight"] > margins["estimated"]]) == 0


@pytest.mark.slow
def test_a_finished_run_is_reevaluated_with_a_new_attack_from_a_config_folder(
        my_conf, smoke_runs, tmp_path, monkeypatch, synthetic_root, capsys):
    """README: `python -m lipvae.evaluate <run> attack=random --config-dir my_conf`: the option of
    the user's folder, composed by Hydra with the run's choices, attacks the run's frozen model."""
    import json

    from lipvae.evaluate import main as evaluate_main

    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    run = shutil.copytree(smoke_runs[("lipschitz", "learned")], tmp_path / "run")
    args = [str(run), "attack=random", "margins.attacked_inputs=3", "attack.starts=2", "attack.max_radius=2.0"]
    assert evaluate_main(args) == 2  # not a packaged option
    assert capsys.readouterr().err.startswith("error: attack: got 'random'; accepted: lbfgs, pgd, pgd_cold")
    assert evaluate_main([*args, "--config-dir", str(my_conf)]) == 0, capsys.readouterr().err
    (folder,) = (run / "evaluations").iterdir()
    record = json.loads((folder / "evaluation.json").read_text())
    assert record["estimated"]["method"] == "random_directions" and record["estimated"]["num_inputs"] == 3
    assert record["soundness_violations"] == 0 and not record["reused_estimated_margins"]
    margins = pd.read_csv(folder / "margins.csv")
    assert ((margins["estimated"] / 0.25).round() * 0.25 - margins["estimated"]).abs().max() < 1e-9
    assert evaluate_main([str(run), "--config-dir", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --config-dir: got '{tmp_path / 'nope'}'; accepted: an existing folder of config groups"
