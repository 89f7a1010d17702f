import math
from functools import partial

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import every_kth_fast, needs_real_mnist
from lipvae.data import ImageDataModule
from lipvae.networks import BjorckLinear
from lipvae.vae import VAE


def tiny(**kw):
    args = dict(input_dim=20, latent_dim=4, hidden=(16, 16))
    args.update(kw)
    return VAE(**args)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_a_float64_model_takes_float32_inputs_and_latents(arch):
    """After training with trainer.precision=64-true the weights are float64 while data and
    latent draws stay float32: encode and decode compute in the weights' dtype."""
    from lipvae.networks import AOLLinear

    torch.manual_seed(0)
    vae = VAE(input_shape=(1, 8, 8), latent_dim=3, hidden=(8,), layer=AOLLinear, arch=arch, channels=(4,)).double()
    x, z = torch.rand(5, 64), torch.randn(5, 3)
    assert vae.dtype == torch.float64 and x.dtype == torch.float32
    q, q64 = vae.encode(x), vae.encode(x.double())
    assert q.mean.dtype == torch.float64 and torch.equal(q.mean, q64.mean) and torch.equal(q.std, q64.std)
    assert torch.equal(vae.decode(z), vae.decode(z.double())) and vae.decode(z).dtype == torch.float64
    assert vae.float().encode(x).mean.dtype == torch.float32  # a float32 model computes as before


def test_kl_matches_torch_distributions():
    vae = tiny()
    q = vae.encode(torch.rand(7, 20))
    expected = kl_divergence(Normal(q.mean, q.std), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(VAE.kl(q), expected, atol=1e-5)


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "bernoulli", "gaussian"])
def test_likelihood_is_a_normalised_density_or_mass(likelihood):
    vae = tiny(input_dim=1, likelihood=likelihood, obs_std=0.3)
    probs = torch.tensor([[0.03], [0.3], [0.5], [0.8]])
    if likelihood == "bernoulli":
        total = sum(vae.log_likelihood(torch.full((1,), v), probs).exp() for v in (0.0, 1.0))
    else:
        lo, hi = (0.0, 1.0) if likelihood == "continuous_bernoulli" else (-4.0, 5.0)
        grid = torch.linspace(lo, hi, 20001)
        dens = vae.log_likelihood(grid.view(-1, 1, 1), probs).exp().T  # (4 probabilities, grid)
        assert dens.shape == (4, len(grid))
        total = torch.trapezoid(dens, grid, dim=-1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-3)


def test_fixed_and_bounded_std():
    fixed = tiny(std_mode="fixed", gamma=0.1)
    q = fixed.encode(torch.rand(5, 20))
    assert fixed.encoder_std is None and torch.all(q.std == 0.1)
    assert torch.allclose(q.log_std, torch.full_like(q.std, math.log(0.1)))
    bounded = tiny(std_mode="bounded", max_norm=0.05)
    q = bounded.encode(torch.rand(50, 20))
    assert torch.all(q.std.norm(dim=-1) <= 0.05 + 1e-7)
    assert torch.allclose(q.log_std, q.std.log(), atol=1e-5)


def test_model_schema_covers_every_argument_of_the_vae():
    """The schema checks what VAE trusts: every VAE argument comes from a model field."""
    import inspect

    from lipvae.schema import ModelConfig

    fields = set(ModelConfig.model_fields)
    # VAE's argument -> the model field it is built from (lipvae.build.build_vae)
    source = {"encoder_mean_L": "lipschitz", "encoder_std_L": "lipschitz", "decoder_L": "lipschitz",
              "std_mode": "encoder_std", "gamma": "encoder_std", "max_norm": "encoder_std",
              "input_dim": None, "input_shape": None,  # the data's, given by the run
              "channels": "arch", "kernel_size": "arch"}
    for name in inspect.signature(VAE).parameters:
        assert source.get(name, name) in fields | {None}, name


def test_importance_estimate_is_above_elbo():
    vae = tiny()
    x = torch.rand(64, 20)
    elbo = torch.stack([vae.elbo(x)["elbo"] for _ in range(50)]).mean()
    iw = vae.importance_log_likelihood(x, 200).mean()
    assert iw >= elbo - 0.05


def test_lipschitz_constants_of_fixed_std_model():
    vae = tiny(std_mode="fixed", gamma=0.2, encoder_mean_L=3.0, decoder_L=2.0).freeze()
    c = vae.lipschitz_constants()
    assert c["nominal"]["encoder_std"] == 0.0 and c["measured"]["encoder_std"] == 0.0
    assert abs(c["measured"]["encoder_mean"] - 3.0) < 3e-3
    assert abs(c["measured"]["decoder"] - 0.5) < 1e-3
    assert c["bound"] == pytest.approx({"encoder_mean": 3.0, "encoder_std": 0.0, "decoder": 0.5})
    assert tiny(kind="standard").lipschitz_constants() == {"nominal": None, "bound": None, "measured": None}


def test_std_network_counts_its_sigmoid_head_once():
    """σ's constant includes its sigmoid head exactly once: the VAE's σ, a σ built on its own
    with the head inside the Sequential, and σ's body times the head's slope all agree, and
    no pair of inputs stretches σ(x) by more than that constant (it is sound)."""
    from lipvae.networks import SIGMOID_LIPSCHITZ, lipschitz_mlp, measured_lipschitz

    torch.manual_seed(3)
    vae = tiny(encoder_std_L=8.0, layer=partial(BjorckLinear, iters=30)).freeze()
    c = vae.lipschitz_constants()
    assert c["bound"]["encoder_std"] == pytest.approx(8.0 * SIGMOID_LIPSCHITZ)
    assert c["measured"]["encoder_std"] == pytest.approx(8.0 * SIGMOID_LIPSCHITZ, rel=1e-3)
    alone = lipschitz_mlp([20, 16, 16, 4], 8.0, layer=partial(BjorckLinear, iters=30), sigmoid_head=True)
    assert measured_lipschitz(alone) == pytest.approx(c["measured"]["encoder_std"], rel=1e-3)
    body = vae.encoder_std[:-1]
    assert measured_lipschitz(body) * SIGMOID_LIPSCHITZ == pytest.approx(c["measured"]["encoder_std"])
    # encode's σ is the whole network's output (the head applied once, not twice)
    x = torch.rand(64, 20)
    with torch.no_grad():
        std = vae.encode(x).std
        assert torch.allclose(std, vae.encoder_std(x), atol=1e-6)
    # brute force: the local constant at each input is the spectral norm of σ's Jacobian there
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: vae.encode(v[None]).std[0], xi) for xi in x])
    steepest = float(torch.linalg.matrix_norm(jac.double(), ord=2).max())
    assert steepest <= c["measured"]["encoder_std"] * (1 + 1e-4)
    # and a constant with the head counted twice would be unsound: σ is steeper than that
    assert steepest > c["measured"]["encoder_std"] * SIGMOID_LIPSCHITZ


@needs_real_mnist
@pytest.mark.parametrize("kind", every_kth_fast(["lipschitz", "standard"], 2))
def test_elbo_improves_on_real_images(kind):
    dm = ImageDataModule(resplit=True, limit=512, batch_size=64)
    x = dm.split("train").images[:256]
    vae = VAE(kind=kind, input_shape=dm.input_shape, hidden=(64, 64), latent_dim=8)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = -vae.elbo(x)["elbo"].mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 20  # nats per image


def test_continuous_bernoulli_matches_torch_and_tolerates_nan():
    vae = tiny(input_dim=1)
    probs = torch.tensor([[1e-5], [0.2], [0.4999], [0.5], [0.5003], [0.9], [1 - 1e-5]], dtype=torch.float64)
    for v in (0.0, 0.37, 1.0):
        x = torch.full((1,), v, dtype=torch.float64)
        ref = torch.distributions.ContinuousBernoulli(probs=probs).log_prob(x.expand_as(probs)).squeeze(-1)
        assert torch.allclose(vae.log_likelihood(x, probs), ref, atol=1e-9)
    assert torch.isnan(vae.log_likelihood(torch.zeros(1), torch.tensor([[float("nan")]])))
