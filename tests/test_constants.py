"""The constants a user asks for are the constants a frozen network has (issue: silent wrong
constants): StiefelAdam stays on the manifold at any finite learning rate, and a layer whose
normalisation does not bound the spectral norm is rescaled when frozen, with a warning."""

import logging

import pytest
import torch

from lipvae.lightning.module import make_optimizer, qr_retract
from lipvae.networks import StiefelLinear, TorchlipLinear, lipschitz_mlp, measured_lipschitz, orthonormality_error


@pytest.mark.parametrize("lr", [1e-3, 10.0, 1e6])
def test_stiefel_adam_stays_on_the_manifold_at_any_finite_learning_rate(lr):
    torch.manual_seed(0)
    net = lipschitz_mlp([20, 16, 8], 5.0, layer=StiefelLinear)
    opt = make_optimizer(net.parameters(), lr)
    x = torch.randn(32, 20)
    for _ in range(5):
        loss = net(x).pow(2).sum() * (1 if lr < 1 else -1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert orthonormality_error(net) < 1e-5
    assert measured_lipschitz(net) == pytest.approx(5.0, rel=1e-5)


def test_the_retraction_of_a_far_point_is_orthonormal():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(30, 10, generator=gen) * torch.logspace(0, 6, 10)  # cond 1e6: Cholesky QR would fail
    q = qr_retract(w)
    assert torch.allclose(q.mT @ q, torch.eye(10), atol=1e-5)
    near = torch.linalg.qr(torch.randn(30, 10, generator=gen)).Q + 1e-3 * torch.randn(30, 10, generator=gen)
    assert torch.allclose(qr_retract(near).mT @ qr_retract(near), torch.eye(10), atol=1e-5)


def test_a_layer_that_does_not_bound_its_norm_is_rescaled_when_frozen(caplog):
    pytest.importorskip("deel.torchlip")
    from lipvae.networks import freeze, nominal_lipschitz

    torch.manual_seed(0)
    net = lipschitz_mlp([12, 8, 8], 1.25, layer=lambda i, o, scale: TorchlipLinear(i, o, scale=scale,
                                                                                    kind="FrobeniusLinear"),
                        sigmoid_head=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, TorchlipLinear):
                m.weight.copy_(torch.ones_like(m.weight))  # rank one: ‖W‖₂ = ‖W‖_F for every normalisation
    nominal, before = nominal_lipschitz(net), measured_lipschitz(net)
    assert nominal == pytest.approx(1.25 / 4) and before > 2 * nominal  # the layer kept no bound
    with caplog.at_level(logging.WARNING, logger="lipvae"):
        freeze(net)
    assert measured_lipschitz(net) <= nominal * (1 + 1e-6)
    assert sum("divided by it when freezing" in r.getMessage() for r in caplog.records) == 2
