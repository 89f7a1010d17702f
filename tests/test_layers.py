"""The Stiefel-manifold layer (geoopt's manifold, StiefelAdam) and deel-torchlip's layers: orthonormal
to float tolerance after many steps, measured constants, gradients against finite differences, and
the whole pipeline (train, freeze, certify, attack, soundness check) through ``model/layer``."""

import copy
import itertools
import json
import os
import sys

import pytest
import torch
from torch.func import jacrev, vmap

from conftest import composed, synthetic_data_dir
from lipvae.build import build_layer
from lipvae.errors import UserError
from lipvae.lightning.module import StiefelAdam, make_optimizer
from lipvae.networks import (
    StiefelLinear,
    TorchlipLinear,
    freeze,
    lipschitz_mlp,
    measured_lipschitz,
    nominal_lipschitz,
    orthonormality_error,
)

# a wide layer (30 → 16, stored transposed), a square one and a tall one (16 → 40)
SIZES = [30, 16, 16, 40]


def stiefel_layers(net):
    return [m for m in net.modules() if isinstance(m, StiefelLinear)]


@pytest.mark.slow  # 1,000 optimiser steps
def test_stiefel_weights_stay_orthonormal_after_many_steps_at_lr_1e3():
    net = lipschitz_mlp(SIZES, 4.0, layer=StiefelLinear)
    start = [m.effective_weight().detach().clone() for m in stiefel_layers(net)]
    opt = make_optimizer(net.parameters(), 1e-3)
    assert isinstance(opt, StiefelAdam)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(64, 30, generator=g), torch.randn(64, 40, generator=g)
    losses = []
    for _ in range(1000):
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # it learned
    moved = [float((m.effective_weight().detach() - w0).norm() / w0.norm()) for m, w0 in zip(stiefel_layers(net), start)]
    assert min(moved) > 0.2  # the weights travelled far on the manifold...
    assert orthonormality_error(net) < 1e-5  # ...and are still on it
    for m in stiefel_layers(net):
        w = m.effective_weight().detach().double()
        small = w @ w.mT if m.transposed else w.mT @ w  # the Gram on the smaller side is the identity
        assert torch.allclose(small, torch.eye(len(small), dtype=small.dtype), atol=1e-5)
        assert tuple(w.shape) == (m.out_features, m.in_features)
    # the measured constant is the nominal one; freezing changes nothing
    assert measured_lipschitz(net) == pytest.approx(nominal_lipschitz(net), rel=1e-5)
    before = net(x)
    assert torch.equal(freeze(copy.deepcopy(net))(x), before)


def test_stiefel_gradients_match_finite_differences():
    """Euclidean: autograd's gradient against central differences in every coordinate. Riemannian:
    along a tangent direction ξ through the QR retraction, d/dt f(retr(W, tξ)) = ⟨grad_R f, ξ⟩."""
    net = lipschitz_mlp([6, 4, 4, 8], 2.0, layer=StiefelLinear).double()
    with torch.no_grad():  # orthonormal to float64 precision, not float32's
        for m in stiefel_layers(net):
            m.weight.copy_(m.weight.manifold.projx(m.weight))
    x = torch.randn(5, 6, dtype=torch.float64)

    def f():
        return net(x).sin().sum()

    f().backward()
    h = 1e-6
    g = torch.Generator().manual_seed(2)
    for m in stiefel_layers(net):
        w, manifold = m.weight, m.weight.manifold
        grad = w.grad.clone()
        with torch.no_grad():
            for idx in itertools.product(*map(range, w.shape)):
                w[idx] += h
                up = f()
                w[idx] -= 2 * h
                down = f()
                w[idx] += h
                assert float((up - down) / (2 * h)) == pytest.approx(float(grad[idx]), abs=1e-7)
            rgrad = manifold.egrad2rgrad(w, grad)
            assert torch.allclose(w.mT @ rgrad + rgrad.mT @ w, torch.zeros(w.shape[1], w.shape[1], dtype=w.dtype),
                                  atol=1e-12)  # tangent at w
            point = w.clone()
            for _ in range(3):
                xi = manifold.proju(point, torch.randn(w.shape, generator=g, dtype=w.dtype))
                w.copy_(manifold.retr(point, h * xi))
                up = f()
                w.copy_(manifold.retr(point, -h * xi))
                down = f()
                w.copy_(point)
                assert float((up - down) / (2 * h)) == pytest.approx(float((rgrad * xi).sum()), rel=1e-6, abs=1e-9)


def test_torchlip_layers_are_sound_with_their_measured_constants():
    pytest.importorskip("deel.torchlip")
    net = lipschitz_mlp([20, 16, 16, 8], 3.0, layer=TorchlipLinear)
    with torch.no_grad():  # raw weights as training leaves them: the normalisation must hold for any
        for m in net.modules():
            if isinstance(m, TorchlipLinear):
                m.weight.add_(0.5 * torch.randn_like(m.weight))
    net.eval()
    measured = measured_lipschitz(net)
    assert measured == pytest.approx(3.0, rel=1e-2)  # deel-torchlip normalises to a tolerance, not exactly
    x = torch.randn(200, 20)
    sv = torch.linalg.svdvals(vmap(jacrev(net))(x))
    assert sv.max() <= measured * (1 + 1e-5)  # no input is stretched beyond the measured constant
    with torch.no_grad():
        before = net(x)
        frozen = freeze(copy.deepcopy(net))
        assert not any(isinstance(m, TorchlipLinear) for m in frozen.modules())
        assert torch.allclose(frozen(x), before, atol=1e-5)
        assert measured_lipschitz(frozen) == pytest.approx(measured, rel=1e-6)


def test_a_missing_deel_torchlip_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "deel", None)  # as if not installed
    cfg = composed("model/layer=torchlip")
    with pytest.raises(UserError) as err:
        build_layer(cfg.model)
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.layer: cannot build lipvae.networks.TorchlipLinear")
    assert "pip install 'lipvae[torchlip]'" in message


def _regression(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 30, generator=g), torch.randn(64, 40, generator=g)


def _steps(net, opt, n, x, target):
    for _ in range(n):
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_stiefel_adam_retracts_every_k_steps_and_on_demand():
    torch.manual_seed(0)
    net = lipschitz_mlp(SIZES, 4.0, layer=StiefelLinear)
    opt = make_optimizer(net.parameters(), 1e-2, retract_every=4)
    x, target = _regression()
    errors = []
    for _ in range(8):
        _steps(net, opt, 1, x, target)
        errors.append(orthonormality_error(net))
    # between retractions Adam's steps leave the manifold; every 4th step comes back to it
    assert all(e > 1e-4 for i, e in enumerate(errors) if (i + 1) % 4), errors
    assert errors[3] < 1e-5 and errors[7] < 1e-5, errors
    _steps(net, opt, 1, x, target)
    assert orthonormality_error(net) > 1e-4
    opt.retract()
    assert orthonormality_error(net) < 1e-5


def test_stiefel_adam_resumed_from_its_state_retracts_where_the_uninterrupted_one_does():
    x, target = _regression()
    torch.manual_seed(0)
    whole = lipschitz_mlp(SIZES, 4.0, layer=StiefelLinear)
    first = copy.deepcopy(whole)
    opt = make_optimizer(whole.parameters(), 1e-2, retract_every=3)
    _steps(whole, opt, 7, x, target)
    opt1 = make_optimizer(first.parameters(), 1e-2, retract_every=3)
    _steps(first, opt1, 5, x, target)  # stopped after 5 steps (off the manifold), resumed from the state
    second = copy.deepcopy(first)
    opt2 = make_optimizer(second.parameters(), 1e-2, retract_every=3)
    opt2.load_state_dict(opt1.state_dict())
    _steps(second, opt2, 2, x, target)
    for a, b in zip(whole.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_without_the_tangent_projection_the_step_is_adams_then_the_retraction():
    from lipvae.lightning.module import qr_retract

    torch.manual_seed(0)
    net = lipschitz_mlp(SIZES, 4.0, layer=StiefelLinear)
    plain = copy.deepcopy(net)
    x, target = _regression()
    _steps(net, make_optimizer(net.parameters(), 1e-2, tangent_projection=False), 1, x, target)
    _steps(plain, torch.optim.Adam(plain.parameters(), lr=1e-2), 1, x, target)
    for a, b in zip(stiefel_layers(net), stiefel_layers(plain)):
        assert torch.allclose(a.weight, qr_retract(b.weight.detach()), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["stiefel-every-3", "torchlip"])
def test_the_layer_trains_freezes_certifies_and_passes_the_soundness_check(layer, tmp_path, monkeypatch):
    if layer == "torchlip":
        pytest.importorskip("deel.torchlip")
    from lipvae.training import RunContext, train

    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_data_dir()))
    extra = ["module.retract_every=3", "module.lr=1e-2"] if layer == "stiefel-every-3" else []
    layer = layer.split("-")[0]
    cfg = composed("tier=smoke", "data.resplit=true", f"model/layer={layer}", "trainer.enable_progress_bar=false",
                   "callbacks.finetune.max_epochs=0", "trainer.max_epochs=2", *extra)
    train(cfg, RunContext(tmp_path))
    if extra:  # the checkpoints the evaluation loads hold orthonormal weights, whatever the step count
        for name in ("best.ckpt", "last.ckpt"):
            state = torch.load(tmp_path / "checkpoints" / name, weights_only=False)["state_dict"]
            for key, w in state.items():
                if key.endswith("weight") and w.ndim == 2 and min(w.shape) > 1:
                    small = w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT
                    assert torch.allclose(small, torch.eye(len(small)), atol=1e-5), (name, key)
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "completed" and r["config"]["model"]["layer"]["_target_"].endswith(
        {"stiefel": "StiefelLinear", "torchlip": "TorchlipLinear"}[layer])
    assert r["metrics"]["best_val_loss"] < r["metrics"]["convergence"]["val_losses"][0] + 1e-9
    assert r["certified"]["fraction_certified"] > 0.9 and r["estimated"]["num_inputs"] == 5
    assert r["soundness_violations"] == 0
    measured = r["certified"]["constants"]
    assert measured["b"] == pytest.approx(cfg.enc_L, rel=1e-2)  # the measured constant, within tolerance
    if layer == "stiefel":
        assert r["metrics"]["orthonormality_error_before_freeze"] < 1e-5
    assert os.path.isfile(tmp_path / "frozen_model.pt")


def test_cholesky_qr_retraction_is_geoopts_qr_retraction():
    import geoopt

    from lipvae.lightning.module import qr_retract

    g = torch.Generator().manual_seed(3)
    stiefel = geoopt.EuclideanStiefel()
    for n, p in [(50, 20), (20, 20), (40, 1)]:
        w = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))[0]
        w = w + 0.05 * torch.randn(n, p, generator=g, dtype=torch.float64)  # an Adam step off the manifold
        q = qr_retract(w)
        assert torch.allclose(q, stiefel.retr(w, torch.zeros_like(w)), atol=1e-12)
        assert torch.allclose(q.mT @ q, torch.eye(p, dtype=q.dtype), atol=1e-12)
    singular = torch.zeros(6, 3, dtype=torch.float64)
    singular[:3, :2] = torch.eye(3, 2, dtype=torch.float64)  # rank 2: no Cholesky, geoopt's QR takes over
    assert torch.isfinite(qr_retract(singular)).all()
