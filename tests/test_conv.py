"""Convolutional VAEs (lipvae.conv): every constant an upper bound of the true one, checked
against the dense Jacobian in float64; shapes from the data; freezing exact."""

import pytest
import torch
from torch import nn

from lipvae.conv import CircularConv2d, ConvNet, circular_conv, circular_conv_norm, conv_decoder, conv_encoder
from lipvae.errors import UserError
from lipvae.networks import ChannelGroupSort2, StiefelLinear, measured_lipschitz, nominal_lipschitz
from lipvae.vae import VAE

from conftest import every_kth_fast


def dense(fn, shape) -> torch.Tensor:
    """The matrix of a linear map of inputs of ``shape``, column by column (float64)."""
    n = torch.Size(shape).numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return fn(basis).reshape(n, -1).T


def jacobian_norm(net, x) -> float:
    """The spectral norm of ``net``'s dense Jacobian at ``x``: forward mode when the output is the
    larger side (a decoder's: a few passes instead of one per pixel)."""
    f = lambda v: net(v[None])[0]  # noqa: E731
    jac = (torch.func.jacfwd if f(x).numel() > x.numel() else torch.func.jacrev)(f)(x)
    return float(torch.linalg.matrix_norm(jac.detach().reshape(-1, x.numel()), ord=2))


@pytest.mark.parametrize("c_in, c_out, k, size", [(2, 3, 3, (5, 6)), (3, 3, 3, (4, 4)), (1, 4, 5, (3, 3)),
                                                  (4, 2, 1, (2, 5))])
def test_the_fft_norm_is_the_circular_convolutions_exact_norm(c_in, c_out, k, size):
    gen = torch.Generator().manual_seed(c_in * 10 + k)
    kernel = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64)
    matrix = dense(lambda x: circular_conv(x, kernel, None), (c_in, *size))
    exact = float(torch.linalg.matrix_norm(matrix, ord=2))
    assert float(circular_conv_norm(kernel, size)) == pytest.approx(exact, rel=1e-10)


def test_a_zero_padded_convolution_is_bounded_by_the_circular_one_on_the_padded_grid():
    """The fact docs/math.md uses for zero padding: ‖conv on n×n, zero padded‖ ≤ ‖circular on (n+k−1)²‖."""
    gen = torch.Generator().manual_seed(3)
    kernel = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    matrix = dense(lambda x: nn.functional.conv2d(x, kernel, padding=1), (2, 5, 5))
    assert float(torch.linalg.matrix_norm(matrix, ord=2)) <= float(circular_conv_norm(kernel, (7, 7))) + 1e-12


def test_a_lipschitz_convolution_has_exactly_its_scale():
    torch.manual_seed(0)
    layer = CircularConv2d(2, 4, (6, 6), scale=1.7).double()
    with torch.no_grad():
        layer.weight.mul_(9.0)  # whatever training does to the raw kernel
    matrix = dense(lambda x: layer(x) - layer(torch.zeros_like(x)), (2, 6, 6))
    exact = float(torch.linalg.matrix_norm(matrix.detach(), ord=2))
    assert exact == pytest.approx(1.7, rel=1e-9)
    assert layer.measured_constant() >= exact * (1 - 1e-12) and layer.measured_constant() == pytest.approx(1.7, rel=1e-9)


def test_resolution_changes_and_channel_groupsort_are_isometries():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 6, 6, generator=gen)
    for mod in (nn.PixelUnshuffle(2), nn.PixelShuffle(2), ChannelGroupSort2()):
        out = mod(x)
        assert torch.allclose(out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    y = torch.randn(5, 4, 6, 6, generator=gen)
    sort = ChannelGroupSort2()
    assert ((sort(x) - sort(y)).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) + 1e-6).all()


@pytest.mark.parametrize("shape", [(1, 20, 20), (3, 32, 32), (2, 8, 12)])
def test_conv_networks_constants_bound_their_jacobians(shape):
    """At random inputs the dense Jacobian's norm never exceeds the measured constant, which is
    within float rounding of the nominal one (scales' product, sigmoid head's ¼)."""
    torch.manual_seed(0)
    enc = conv_encoder(shape, (4, 8), 6, 3.0, layer=StiefelLinear).double()
    dec = conv_decoder(6, shape, (4, 8), 2.0, layer=StiefelLinear).double()
    assert nominal_lipschitz(enc) == pytest.approx(3.0) and nominal_lipschitz(dec) == pytest.approx(0.5)
    assert measured_lipschitz(enc) == pytest.approx(3.0, rel=1e-6) and measured_lipschitz(dec) == pytest.approx(0.5, rel=1e-6)
    gen = torch.Generator().manual_seed(2)
    d = torch.Size(shape).numel()
    for _ in range(3):
        x = torch.rand(d, generator=gen, dtype=torch.float64)
        assert jacobian_norm(enc, x) <= measured_lipschitz(enc) * (1 + 1e-9)
        z = torch.randn(6, generator=gen, dtype=torch.float64)
        assert jacobian_norm(dec, z) <= measured_lipschitz(dec) * (1 + 1e-9)


def test_shapes_that_the_stages_cannot_halve_are_one_line():
    with pytest.raises(UserError, match=r"^model\.arch\.channels: got \[4, 8, 16\], whose stages halve 28×28 images 3 times; accepted: .*"
                       r"at most 2 here, e.g. model\.arch\.channels=\[4, 8\]\), or .*data\.size="):
        conv_encoder((1, 28, 28), (4, 8, 16), 4, 1.0)
    with pytest.raises(UserError, match=r"^model\.arch\.channels: got \[4\], whose stages halve 25×30 images once; .*\(none here: use model/arch=mlp\)"):
        conv_encoder((1, 25, 30), (4,), 4, 1.0)
    with pytest.raises(UserError, match=r"^model\.arch\.channels: got \[4, 3\]; accepted: positive even"):
        conv_encoder((1, 28, 28), (4, 3), 4, 1.0)
    with pytest.raises(UserError, match=r"^model\.arch: got conv for inputs of shape \(784,\)"):
        conv_encoder((784,), (4,), 4, 1.0)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 20, 20), (3, 32, 32)])
@pytest.mark.parametrize("kind", ["lipschitz", "standard"])
def test_a_vae_is_built_for_the_datas_shape(arch, shape, kind):
    torch.manual_seed(0)
    vae = VAE(kind=kind, input_shape=shape, latent_dim=4, hidden=(16, 16), arch=arch, channels=(4, 8),
              std_mode="learned")
    d = torch.Size(shape).numel()
    assert vae.input_dim == d and tuple(vae.data_shape.tolist()) == shape
    x = torch.rand(5, d)
    out = vae.elbo(x)
    assert out["elbo"].shape == (5,) and torch.isfinite(out["elbo"]).all()
    assert vae.decode(torch.randn(3, 5, 4)).shape == (3, 5, d)  # leading sample dimensions
    assert vae.importance_log_likelihood(x, 4).shape == (5,)
    if kind == "lipschitz":
        assert vae.lipschitz_constants()["measured"]["encoder_mean"] == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize("mode", ["learned", "bounded", "fixed"])
def test_freezing_a_conv_vae_changes_nothing(mode):
    torch.manual_seed(0)
    vae = VAE(kind="lipschitz", input_shape=(1, 8, 8), latent_dim=3, arch="conv", channels=(4,), std_mode=mode,
              gamma=0.2, max_norm=0.9, layer=StiefelLinear).double()
    with torch.no_grad():  # as after training: raw kernels far from normalised
        for m in vae.modules():
            if isinstance(m, CircularConv2d):
                m.weight.mul_(5.0)
    vae.eval()
    x = torch.rand(6, 64, dtype=torch.float64)
    before_q, before_g = vae.encode(x), vae.decode(torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    constants = vae.lipschitz_constants()["measured"]
    vae.freeze()
    assert not any(isinstance(m, CircularConv2d) for m in vae.modules())
    after_q, after_g = vae.encode(x), vae.decode(torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(before_q.mean, after_q.mean, atol=1e-12) and torch.allclose(before_q.std, after_q.std, atol=1e-12)
    assert torch.allclose(before_g, after_g, atol=1e-12)
    for name, value in vae.lipschitz_constants()["measured"].items():
        assert value == pytest.approx(constants[name], rel=1e-9)


def test_a_conv_net_keeps_working_when_sliced():
    """VAE.encode runs σ's body without its head: a slice of a ConvNet is a ConvNet."""
    net = conv_encoder((1, 8, 8), (4,), 3, 1.0, sigmoid_head=True)
    body = net[:-1]
    assert isinstance(body, ConvNet) and body(torch.rand(2, 5, 64)).shape == (2, 5, 3)


def _blobs(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    corner = torch.randint(0, size - 3, (n, 2), generator=gen)
    for i, (r, c) in enumerate(corner.tolist()):
        x[i, 0, r:r + 3, c:c + 3] = 1.0
    return x.flatten(1)


@pytest.mark.parametrize("mode", every_kth_fast(["learned", "fixed"], 2))
def test_a_trained_conv_vae_has_no_soundness_violation_under_a_strong_attack(mode):
    """Trained on blobs, frozen, certified (tight and Cantelli forms) and attacked with twice the
    default attack's starts and steps: no certificate exceeds its estimated margin, and the attack
    is not vacuous (most margins below its largest radius)."""
    import numpy as np

    from lipvae.attack import PGDAttack
    from lipvae.certify.certificates import certify

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    vae = VAE(kind="lipschitz", input_shape=(1, 8, 8), latent_dim=3, arch="conv", channels=(4,), std_mode=mode,
              gamma=0.2, encoder_mean_L=4.0, encoder_std_L=4.0, decoder_L=4.0, layer=StiefelLinear)
    from lipvae.lightning.module import make_optimizer

    opt = make_optimizer(vae.parameters(), 3e-3)
    data = _blobs(256, 8, gen)
    for _ in range(80):
        loss = -vae.elbo(data)["elbo"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.freeze().eval()
    x = data[:6]
    r, p = 3.0, 0.5
    table, _ = certify(vae, x, np.arange(6), np.zeros(6, dtype=int), vae.lipschitz_constants(), [r], [p],
                       ["tight", "cantelli"])
    attack = PGDAttack(r=r, p=p, samples=40, starts=10, steps=200, max_radius=10.0, pixel_range=False)
    est = attack.estimate(vae, x, torch.Generator().manual_seed(2), progress=False)
    margin = torch.as_tensor(est.margin).numpy()
    assert (~torch.as_tensor(est.censored)).sum() >= 4, margin
    for form in ("tight", "cantelli"):
        certified = table[f"certified_{form}"].to_numpy()
        assert (certified > 0).all() and (certified <= margin + 1e-6).all(), (form, certified, margin)


def test_no_image_size_is_written_into_the_model_code():
    """The input shape comes from the data: no 784 or 28 in the networks' and the VAE's code."""
    import re

    from conftest import PROJECT

    for name in ("vae.py", "networks.py", "conv.py"):
        code = "\n".join(line.split("#")[0] for line in (PROJECT / "src" / "lipvae" / name).read_text().splitlines()
                         if not line.strip().startswith(("\"", "'", "``")))
        assert not re.search(r"(?<![\w.])(784|28)(?![\w.])", code), name
