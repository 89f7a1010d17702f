"""Convolutional networks for images: Lipschitz ones whose constants are exact, and their
unconstrained twins.

A Lipschitz convolution here is **circular** (wrap-around padding, stride 1), so its operator
norm on an ``h × w`` image is known exactly (Sedghi, Gupta & Long 2019): the largest singular
value, over the ``h·w`` spatial frequencies, of the ``c_out × c_in`` matrix that the 2-D FFT
of the kernel gives at that frequency. ``CircularConv2d`` divides its kernel by that norm in
every forward pass, so the layer's constant is ``scale`` exactly (up to float rounding), and
``circular_conv_norm`` gives the measured constant of any kernel from the weights the forward
pass uses: never a power-iteration estimate, which is a lower bound.

Resolution changes are permutations of the entries (``PixelUnshuffle`` down, ``PixelShuffle``
up), activations are GroupSort over channel pairs at each pixel: both have constant 1. So a
network's constant is the product of its layers' scales, as for the fully connected ones.

Inputs stay flat vectors everywhere in lipvae (the attacks, certificates and likelihoods work on
``N × D``): the networks unflatten an input to ``C × H × W`` first (a reshape: constant 1) and
flatten their output at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lipvae.errors import UserError
from lipvae.networks import BjorckLinear, ChannelGroupSort2, GroupSort2, LipschitzLinear, cpu_float64


def circular_conv_norm(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The exact operator 2-norm of the circular cross-correlation by ``kernel``
    (``c_out × c_in × k_h × k_w``) on ``size = (h, w)`` images, differentiable: the largest
    singular value of the per-frequency matrices of the kernel's 2-D FFT (zero-padded to
    ``size``). A kernel larger than the image wraps around: its taps are summed modulo the size
    first, which is what the circular operator does."""
    h, w = size
    kh, kw = kernel.shape[-2:]
    if kh > h or kw > w:  # fold the taps that wrap onto the same pixel
        folded = kernel.new_zeros(*kernel.shape[:2], h, w)
        for a in range(kh):
            for b in range(kw):
                folded[..., a % h, b % w] += kernel[..., a, b]
        kernel = folded
    # a real kernel's spectrum is conjugate-symmetric, P(−u, −v) = conj P(u, v), with the same
    # singular values: the half that rfft2 returns has them all
    spectrum = torch.fft.rfft2(kernel, s=(h, w))  # c_out × c_in × h × (w//2 + 1), complex
    per_freq = spectrum.permute(2, 3, 0, 1).reshape(-1, *spectrum.shape[:2])  # frequencies × c_out × c_in
    tall = per_freq.shape[-1] <= per_freq.shape[-2]
    with torch.no_grad():  # the largest singular value from the smaller Gram matrix (Hermitian)
        p = per_freq.detach()
        gram = p.mH @ p if tall else p @ p.mH
        values, vectors = torch.linalg.eigh(gram)
        top = values[:, -1].argmax()
    if not (torch.is_grad_enabled() and kernel.requires_grad):
        return values[top, -1].clamp_min(0).sqrt()
    # with a gradient: ‖P v‖ at the top frequency, v its top right singular vector (u for a wide
    # P), whose derivative is the top singular value's (u vᴴ); one frequency's cost, not all
    v = vectors[top, :, -1]
    return torch.linalg.vector_norm((per_freq[top] @ v) if tall else (v.conj() @ per_freq[top]))


class CircularConv2d(nn.Module):
    """``y = scale · conv(x, K / ‖K‖) + b`` with circular padding (``k // 2`` each side, odd
    ``k``) and stride 1 on ``size`` images, where ``‖K‖`` is the exact norm of the circular
    convolution (``circular_conv_norm``): constant ``scale`` by construction, measured from the
    weight it runs with. In eval mode the normalised kernel is cached until the parameter changes.
    """

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int], kernel_size: int = 3,
                 scale: float = 1.0, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (got {kernel_size}): the padding is k // 2 on each side")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.size, self.scale = (int(size[0]), int(size[1])), float(scale)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._cache: tuple[int, torch.Tensor] | None = None

    def effective_weight(self) -> torch.Tensor:
        """``K / ‖K‖``: the kernel the forward pass uses, before ``scale`` (norm 1)."""
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.weight / circular_conv_norm(self.weight, self.size).clamp_min(1e-12)
        if self._cache is None or self._cache[0] != self.weight._version:
            self._cache = (self.weight._version, self.weight / circular_conv_norm(self.weight, self.size).clamp_min(1e-12))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return circular_conv(x, self.scale * self.effective_weight(), self.bias)

    def frozen(self) -> FrozenCircularConv2d:
        """A plain layer holding ``scale · K / ‖K‖`` and the bias."""
        with torch.no_grad():
            weight = self.scale * self.effective_weight()
        return FrozenCircularConv2d(weight.detach().clone(), None if self.bias is None else self.bias.detach().clone(),
                                    self.size)

    @torch.no_grad()
    def measured_constant(self) -> float:
        """``scale · ‖K / ‖K‖‖``, computed again in float64 from the kernel the forward pass uses."""
        return self.scale * float(circular_conv_norm(cpu_float64(self.effective_weight()), self.size))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, size={self.size}, "
                f"scale={self.scale:.4g}")


def circular_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    pad = weight.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="circular"), weight, bias)


class FrozenCircularConv2d(nn.Module):
    """A circular convolution with a fixed kernel (a frozen ``CircularConv2d``): its constant is
    measured exactly from that kernel on its image size."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return circular_conv(x, self.weight, self.bias)

    @torch.no_grad()
    def measured_constant(self) -> float:
        """The exact norm of the circular convolution by this kernel (float64)."""
        return float(circular_conv_norm(cpu_float64(self.weight), self.size))


class ConvNet(nn.Sequential):
    """A sequential network on flat inputs whose modules may be convolutional: any leading batch
    dimensions (``K × N × D`` samples) are folded into one for the modules and unfolded after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = super().forward(x.reshape(-1, x.shape[-1]))
        return out.reshape(*lead, out.shape[-1])


def check_conv_shape(input_shape: Sequence[int], channels: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input; one line when the shape cannot take ``len(channels)``
    halvings of its resolution, or a channel count is odd (GroupSort pairs)."""
    if len(input_shape) != 3:
        raise UserError(f"model.arch: got conv for inputs of shape {tuple(input_shape)}; accepted: image data"
                        " (C × H × W), or model/arch=mlp")
    c, h, w = (int(s) for s in input_shape)
    k = 2 ** len(channels)
    if h % k or w % k:
        n = _halvings(h, w)
        fits = f"at most {n} here, e.g. model.arch.channels={list(channels[:n])}" if n else "none here:" \
            " use model/arch=mlp"
        times = {1: "once", 2: "twice"}.get(len(channels), f"{len(channels)} times")
        raise UserError(f"model.arch.channels: got {list(channels)}, whose stages halve {h}×{w} images {times};"
                        f" accepted: as many stages as keep H and W divisible ({fits}), or images resized to a"
                        " size that divides (data.size=[H,W] with data=image_folder or torchvision)")
    if any(ch <= 0 or ch % 2 for ch in channels):
        raise UserError(f"model.arch.channels: got {list(channels)}; accepted: positive even channel counts"
                        " (GroupSort groups of 2)")
    return c, h, w


def _halvings(h: int, w: int) -> int:
    n = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > 1:
        h, w, n = h // 2, w // 2, n + 1
    return n


def conv_encoder(input_shape: Sequence[int], channels: Sequence[int], out_dim: int, lipschitz: float | None,
                 layer: Callable[..., LipschitzLinear] = BjorckLinear, kernel_size: int = 3,
                 sigmoid_head: bool = False) -> ConvNet:
    """``x → [conv, GroupSort (ReLU), PixelUnshuffle(2)] per stage → flatten → linear → out_dim``.

    Lipschitz (``lipschitz`` given): circular convolutions of exact norm and a ``layer`` linear
    head, each scaled by ``lipschitz^(1/k)`` for the k layers. Standard (``None``): zero-padded
    ``nn.Conv2d`` and ``nn.Linear`` with ReLU."""
    c, h, w = check_conv_shape(input_shape, channels)
    k = len(channels) + 1
    scale = None if lipschitz is None else lipschitz ** (1.0 / k)
    mods: list[nn.Module] = [nn.Unflatten(-1, (c, h, w))]
    for ch in channels:
        if scale is None:
            mods += [nn.Conv2d(c, ch, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        else:
            mods += [CircularConv2d(c, ch, (h, w), kernel_size, scale=scale), ChannelGroupSort2()]
        mods.append(nn.PixelUnshuffle(2))
        c, h, w = 4 * ch, h // 2, w // 2
    mods.append(nn.Flatten(-3))
    mods.append(nn.Linear(c * h * w, out_dim) if scale is None else layer(c * h * w, out_dim, scale=scale))
    if sigmoid_head:
        mods.append(nn.Sigmoid())
    return ConvNet(*mods)


def conv_decoder(latent_dim: int, output_shape: Sequence[int], channels: Sequence[int], lipschitz: float | None,
                 layer: Callable[..., LipschitzLinear] = BjorckLinear, kernel_size: int = 3,
                 sigmoid_head: bool = True) -> ConvNet:
    """The encoder mirrored: ``z → linear → (4·c_last) × H/2^s × W/2^s → [PixelShuffle(2), conv,
    GroupSort] per stage, the last conv to the image's channels → flatten``."""
    c_out, h, w = check_conv_shape(output_shape, channels)
    s = len(channels)
    k = s + 1
    scale = None if lipschitz is None else lipschitz ** (1.0 / k)
    hs, ws = h // 2**s, w // 2**s
    first = 4 * channels[-1] * hs * ws
    mods: list[nn.Module] = [nn.Linear(latent_dim, first) if scale is None else layer(latent_dim, first, scale=scale)]
    mods += [nn.ReLU() if scale is None else GroupSort2(), nn.Unflatten(-1, (4 * channels[-1], hs, ws))]
    for i in reversed(range(s)):  # 4·c_i channels → PixelShuffle → c_i → conv → 4·c_(i-1), or the image's
        hs, ws = hs * 2, ws * 2
        nxt = c_out if i == 0 else 4 * channels[i - 1]
        mods.append(nn.PixelShuffle(2))
        if scale is None:
            mods.append(nn.Conv2d(channels[i], nxt, kernel_size, padding=kernel_size // 2))
        else:
            mods.append(CircularConv2d(channels[i], nxt, (hs, ws), kernel_size, scale=scale))
        if i > 0:
            mods.append(nn.ReLU() if scale is None else ChannelGroupSort2())
    mods.append(nn.Flatten(-3))
    if sigmoid_head:
        mods.append(nn.Sigmoid())
    return ConvNet(*mods)
