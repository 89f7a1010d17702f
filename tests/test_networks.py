import copy
import math
from functools import partial

import pytest
import torch
from torch import nn

from lipvae.networks import (
    BjorckLinear,
    GroupSort2,
    bjorck_orthonormalize,
    freeze,
    lipschitz_mlp,
    measured_lipschitz,
    polar_factor,
)


def _singular_values(w):
    return torch.linalg.svdvals(w.double())


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_bjorck_converges_to_polar_factor(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    w = w / torch.linalg.matrix_norm(w, ord=2) * 1.5  # inside Björck's region (‖W‖₂ < √3)
    errors = []
    for iters in (1, 3, 10, 40):
        s = _singular_values(bjorck_orthonormalize(w, iters))
        errors.append((s - 1).abs().max().item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-10
    assert torch.allclose(bjorck_orthonormalize(w, 60), polar_factor(w), atol=1e-9)


def test_bjorck_small_gram_side_equals_textbook_iteration():
    w = torch.randn(40, 7, dtype=torch.float64) * 0.2
    for v in (w, w.T):
        ref = v.clone()
        for _ in range(5):
            ref = 1.5 * ref - 0.5 * ref @ ref.T @ ref
        assert torch.allclose(bjorck_orthonormalize(v, 5), ref, atol=1e-12)


def test_bjorck_tolerance_stops_early_but_converged():
    w = torch.randn(30, 20, dtype=torch.float64)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    out = bjorck_orthonormalize(w, 200, tol=1e-8)
    assert torch.linalg.matrix_norm(out.T @ out - torch.eye(20, dtype=torch.float64)) < 1e-7


def test_groupsort_is_one_lipschitz_and_sorts_pairs():
    f = GroupSort2()
    x, y = torch.randn(500, 16), torch.randn(500, 16)
    assert torch.all((f(x) - f(y)).norm(dim=1) <= (x - y).norm(dim=1) + 1e-6)
    out = f(torch.tensor([[3.0, 1.0, -2.0, 5.0]]))
    assert out.tolist() == [[1.0, 3.0, -2.0, 5.0]]


def test_groupsort_preserves_gradient_norm():
    x = torch.randn(8, 10, requires_grad=True)
    v = torch.randn(8, 10)
    (g,) = torch.autograd.grad(GroupSort2()(x), x, grad_outputs=v)
    assert torch.allclose(g.norm(dim=1), v.norm(dim=1), atol=1e-6)


def _empirical_lipschitz(net, dim, n=2000):
    """Brute force lower estimate: the largest Jacobian spectral norm over random inputs."""
    xs = torch.randn(20, dim) * 3
    best = 0.0
    for x in xs:
        jac = torch.autograd.functional.jacobian(net, x)
        best = max(best, torch.linalg.matrix_norm(jac, ord=2).item())
    x, y = torch.randn(n, dim), torch.randn(n, dim)
    ratio = ((net(x) - net(y)).norm(dim=1) / (x - y).norm(dim=1)).max().item()
    return max(best, ratio)


@pytest.mark.parametrize("L", [0.5, 5.0, 10.0])
def test_measured_bound_is_sound_and_close_to_nominal(L):
    net = lipschitz_mlp([20, 16, 16, 4], L, layer=partial(BjorckLinear, iters=3))
    with torch.no_grad():  # move weights away from orthonormal, as training does
        for m in net.modules():
            if isinstance(m, BjorckLinear):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
    for _ in range(30):  # training forwards keep the power-iteration estimate of ‖W‖₂ current
        net(torch.randn(4, 20))
    measured = measured_lipschitz(net)
    assert _empirical_lipschitz(net, 20) <= measured * (1 + 1e-5)
    # Björck maps singular values in (0, √3) into (0, 1]: never above nominal.
    assert measured <= L * (1 + 1e-4)
    freeze(net)
    assert not any(isinstance(m, BjorckLinear) for m in net.modules())
    assert abs(measured_lipschitz(net) - L) <= 1e-3 * L
    assert _empirical_lipschitz(net, 20) <= L * (1 + 1e-3)


def test_sigmoid_head_counts_one_quarter():
    net = lipschitz_mlp([6, 4, 2], 4.0, sigmoid_head=True)
    freeze(net)
    assert abs(measured_lipschitz(net) - 1.0) < 1e-4


def test_frozen_layer_matches_converged_bjorck_layer():
    layer = BjorckLinear(12, 8, scale=2.0, iters=60)
    with torch.no_grad():
        layer.weight.mul_(1.3).add_(0.1 * torch.randn_like(layer.weight))
    x = torch.randn(5, 12)
    expected = layer(x)
    assert torch.allclose(layer.frozen()(x), expected, atol=1e-5)


def test_eval_cache_follows_parameter_updates():
    layer = BjorckLinear(6, 6, iters=5)
    layer.eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        first = layer(x)
        assert layer._cache is not None
        layer.weight.mul_(0.9).add_(0.1 * torch.randn_like(layer.weight))
        second = layer(x)
        fresh = copy.deepcopy(layer)
        fresh._cache = None
        expected = fresh(x)
    assert not torch.allclose(first, second)
    assert torch.allclose(second, expected, atol=1e-7)


def test_measured_lipschitz_rejects_unknown_activation():
    with pytest.raises(TypeError, match="Tanh"):
        measured_lipschitz(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    assert math.isclose(measured_lipschitz(nn.Sequential(nn.Identity())), 1.0)


def test_projection_keeps_trained_weights_orthonormal():
    from lipvae.networks import orthonormality_error, project_bjorck_

    torch.manual_seed(0)
    net = lipschitz_mlp([30, 16, 16, 6], 3.0, layer=partial(BjorckLinear, iters=3))
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    drifted = copy.deepcopy(net)
    opt_d = torch.optim.Adam(drifted.parameters(), lr=3e-2)
    for _ in range(30):
        for model, optimiser, project in ((net, opt, True), (drifted, opt_d, False)):
            loss = (model(torch.randn(64, 30)) - 1.0).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if project:
                project_bjorck_(model, 2)
    assert orthonormality_error(net) < 1e-4
    assert orthonormality_error(drifted) > 10 * orthonormality_error(net)
    x = torch.randn(8, 30)
    before = net(x)
    assert torch.allclose(freeze(copy.deepcopy(net))(x), before, atol=1e-4)  # freezing changes nothing


def test_aol_layer_is_one_lipschitz_without_iterations():
    from lipvae.networks import AOLLinear

    torch.manual_seed(0)
    net = lipschitz_mlp([20, 16, 16, 4], 3.0, layer=AOLLinear)
    assert not any(isinstance(m, BjorckLinear) for m in net.modules())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, AOLLinear):
                m.weight.add_(torch.randn_like(m.weight))  # any weights stay 1-Lipschitz
    measured = measured_lipschitz(net)
    assert measured <= 3.0 * (1 + 1e-6)
    assert _empirical_lipschitz(net, 20) <= measured * (1 + 1e-5)
    x = torch.randn(5, 20)
    before = net(x)
    freeze(net)
    assert torch.allclose(net(x), before, atol=1e-6)
    assert abs(measured_lipschitz(net) - measured) < 1e-6 * measured


def test_with_projection_one_in_graph_iteration_trains_like_three():
    """The default (model.layer.iters=1, model.layer.project_iters=2) rests on this: once the projection
    keeps the weights orthonormal, further in-graph iterations change neither loss nor gradient.
    Without the projection the counts differ, so the comparison can tell them apart."""
    from lipvae.networks import project_bjorck_

    def trained(iters, project):
        torch.manual_seed(0)
        net = lipschitz_mlp([30, 16, 16, 6], 3.0, layer=partial(BjorckLinear, iters=iters)).double()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(40):
            loss = (net(torch.randn(64, 30, generator=data, dtype=torch.float64)) - 1.0).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if project:
                project_bjorck_(net, 2)
            losses.append(loss.item())
        return torch.tensor(losses)

    one, three = trained(1, True), trained(3, True)
    assert torch.allclose(one, three, rtol=1e-4)
    assert not torch.allclose(trained(1, False), trained(3, False), rtol=1e-2)


@pytest.mark.parametrize("sizes", [[40, 32, 32, 4], [4, 32, 32, 40]], ids=["narrowing", "widening"])
def test_frozen_bjorck_network_is_an_exact_scaled_isometry_wherever_differentiable(sizes):
    """docs/math.md §3, "Where the slack is": with monotone widths, every singular value of a
    frozen Björck + GroupSort network's Jacobian equals its constant L at every point, so no
    local Lipschitz bound on any ball can be below L. AOL layers (not orthonormal) do not have
    this property, so the check can tell them apart."""
    from torch.func import jacrev, vmap

    from lipvae.networks import AOLLinear

    torch.manual_seed(0)
    x = torch.randn(50, sizes[0], dtype=torch.float64) * 3
    bjorck = freeze(lipschitz_mlp(sizes, 3.0).double())
    sv = torch.linalg.svdvals(vmap(jacrev(bjorck))(x))  # 50 points × min(in, out) values
    L = measured_lipschitz(bjorck)
    assert abs(L - 3.0) < 1e-9 and torch.allclose(sv, torch.full_like(sv, L), rtol=1e-9)
    aol = lipschitz_mlp(sizes, 3.0, layer=AOLLinear).double()
    with torch.no_grad():
        for m in aol.modules():
            if isinstance(m, AOLLinear):
                m.weight.add_(torch.randn_like(m.weight))  # AOL is 1-Lipschitz for any weights
    sv = torch.linalg.svdvals(vmap(jacrev(aol))(x))
    assert (sv.max() - sv.min()) / sv.max() > 0.1 and sv.max() <= measured_lipschitz(aol) * (1 + 1e-9)
