"""Lipschitz networks (docs/math.md §1; Anil et al. 2019) and their unconstrained twins.

A Lipschitz MLP with k linear layers is built from ``BjorckLinear`` layers whose
weights are orthonormalised by Björck iteration and whose outputs are scaled by
``L^(1/k)``, with ``GroupSort2`` between them. ``freeze`` swaps every Björck layer
for a plain ``nn.Linear`` holding the exact polar factor, and
``measured_lipschitz`` computes the bound ``L̂ = Π scale_i ‖W_i‖₂ · Π act`` from
the weights actually used, which is what certificates must trust.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def bjorck_orthonormalize(
    w: torch.Tensor, iters: int, beta: float = 0.5, tol: float | None = None
) -> torch.Tensor:
    """Björck iteration of order 1: ``W ← (1 + β) W − β W Wᵀ W``, ``iters`` times.

    It converges to the polar factor of ``W`` when ``‖W‖₂ < √3``. The product is
    formed on whichever of ``W``, ``Wᵀ`` has the smaller Gram matrix: the result is
    identical, the cost is ``O(max·min²)`` instead of ``O(max²·min)``. With ``tol``,
    iteration stops early once ``‖WᵀW − I‖_F ≤ tol`` (checked on the small Gram).
    Works on batches of matrices (``... × out × in``).
    """
    wide = w.shape[-2] < w.shape[-1]
    v = w.mT if wide else w
    eye = None
    for _ in range(iters):
        gram = v.mT @ v
        if tol is not None:
            if eye is None:
                eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            if torch.linalg.matrix_norm(gram - eye).max().item() <= tol:
                break
        v = (1.0 + beta) * v - beta * (v @ gram)
    return v.mT if wide else v


def cpu_float64(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, on the CPU, in float64: where every soundness-relevant number is
    computed, whatever device the model is on (Apple's MPS has no float64)."""
    return t.detach().to("cpu").to(torch.float64)


def polar_factor(w: torch.Tensor) -> torch.Tensor:
    """The nearest (semi-)orthonormal matrix ``U Vᵀ`` to ``W = U S Vᵀ``: Björck's limit,
    computed in float64 on the CPU and returned on ``w``'s device and dtype."""
    u, _, vh = torch.linalg.svd(cpu_float64(w), full_matrices=False)
    return (u @ vh).to(device=w.device, dtype=w.dtype)


class GroupSort2(nn.Module):
    """GroupSort with groups of two: each pair becomes (min, max).

    1-Lipschitz and gradient-norm preserving (a permutation on every input).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim=-1).flatten(-2)


#: a frozen weight's spectral norm may exceed 1 by this much (float rounding) before it is rescaled
FREEZE_TOLERANCE = 1e-6


class ChannelGroupSort2(nn.Module):
    """GroupSort with groups of two channels at every pixel (``N × C × H × W``, even ``C``):
    each pair becomes (min, max). 1-Lipschitz and gradient-norm preserving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.unflatten(1, (-1, 2))
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        return torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim=2).flatten(1, 2)


class LipschitzLinear(nn.Module):
    """A linear layer whose weight has spectral norm at most 1 by construction, scaled by
    ``scale``: its Lipschitz constant is ``scale`` (nominal) and ``scale · ‖effective_weight()‖₂``
    (measured, what certificates use). A new kind of Lipschitz layer subclasses this and is
    selected by a YAML file in ``conf/model/layer/`` whose ``_target_`` names it (docs/extending.md,
    "Extending"); the networks, freezing and the measured constants then work unchanged.
    """

    in_features: int
    out_features: int
    scale: float
    weight: nn.Parameter
    bias: nn.Parameter | None

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass multiplies by (before ``scale``)."""
        raise NotImplementedError

    def frozen_weight(self) -> torch.Tensor:
        """The weight frozen into a plain layer (before ``scale``); by default the effective one."""
        return self.effective_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.scale * self.effective_weight(), self.bias)

    def frozen(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``scale · frozen_weight()`` and the bias. A frozen weight
        whose spectral norm exceeds 1 (beyond ``FREEZE_TOLERANCE``: a layer whose normalisation
        stops at a tolerance, or does not bound the spectral norm) is divided by that norm, with a
        warning: the frozen network then has the constant the user asked for, never more."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            weight = self.frozen_weight()
            norm = spectral_norm_exact(weight)
            if norm > 1 + FREEZE_TOLERANCE:
                logging.getLogger("lipvae").warning(
                    "%s: the weight's spectral norm is %.6g > 1; divided by it when freezing, so that the layer's"
                    " constant is its scale %.4g (the trained function changes by up to %.2g %%)",
                    type(self).__name__, norm, self.scale, 100 * (1 - 1 / norm))
                weight = weight / norm
            linear.weight.copy_(self.scale * weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:.4g}"


class BjorckLinear(LipschitzLinear):
    """``y = scale · orth(W) x + b`` with ``orth`` Björck's orthonormalisation.

    Before iterating, ``W`` is divided by a power-iteration estimate of ``‖W‖₂`` so
    that Björck starts inside its region of convergence whatever training did to
    the raw parameter. Lipschitz constant: ``scale · ‖orth(W)‖₂`` (≈ ``scale``).
    In eval mode the orthonormalised weight is cached until the parameter changes,
    so evaluation never repeats the iteration.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scale: float = 1.0,
        iters: int = 3,
        beta: float = 0.5,
        tol: float | None = None,
        bias: bool = True,
        project_iters: int = 0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scale, self.iters, self.beta, self.tol = float(scale), int(iters), float(beta), tol
        self.project_iters = int(project_iters)  # Björck steps on W after each optimiser step (0: none)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("_u", F.normalize(torch.randn(out_features), dim=0))
        self._cache: tuple[int, int, torch.Tensor] | None = None

    def _normalised_weight(self) -> torch.Tensor:
        w = self.weight
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                v = F.normalize(w.mT @ self._u, dim=0)
                self._u.copy_(F.normalize(w @ v, dim=0))
        with torch.no_grad():
            v = F.normalize(w.mT @ self._u, dim=0)
        sigma = torch.dot(self._u, w @ v)
        return w / sigma.clamp_min(1e-12)

    def orthonormal_weight(self) -> torch.Tensor:
        """``orth(W)``, without the output scale."""
        return bjorck_orthonormalize(self._normalised_weight(), self.iters, self.beta, self.tol)

    @torch.no_grad()
    def project_(self, iters: int) -> None:
        """Replace the raw parameter by ``orth(W)`` (``iters`` Björck steps, no gradient).

        Run after each optimiser step, it keeps ``W`` orthonormal, so the few in-graph
        iterations start converged: the trained function is the frozen one, and no long
        fine-tune phase is needed to make them agree.
        """
        self.weight.copy_(bjorck_orthonormalize(self._normalised_weight(), iters, self.beta))

    def effective_weight(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.orthonormal_weight()
        key = (self.weight._version, self.iters)
        if self._cache is None or self._cache[:2] != key:
            self._cache = (*key, self.orthonormal_weight())
        return self._cache[2]

    def frozen_weight(self) -> torch.Tensor:
        """``polar(W)``: Björck run to convergence."""
        return polar_factor(self.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scale={self.scale:.4g}, iters={self.iters}, beta={self.beta}"
        )


class AOLLinear(LipschitzLinear):
    """Almost-orthogonal layer (Prach & Lampert 2022): ``y = scale · W D x + b`` with
    ``D = diag(Σ_j |WᵀW|_ij)^(−1/2)``, which makes ``‖W D‖₂ ≤ 1`` exactly, with no iteration.

    Iteration-free and certifiably 1-Lipschitz (times ``scale``), but not orthonormal, so it
    is not gradient-norm preserving like a converged Björck layer.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        d = (w.mT @ w).abs().sum(dim=0).clamp_min(1e-12).rsqrt()
        return w * d


class StiefelLinear(LipschitzLinear):
    """``y = scale · W x + b`` with ``W`` a point of the Stiefel manifold, orthonormal at every step.

    The weight is a ``geoopt.ManifoldParameter`` on ``EuclideanStiefel``. Trained with
    ``lipvae.lightning.module.StiefelAdam`` (which ``VAEModule`` picks when a model holds such a weight):
    the gradient is projected onto the tangent space, Adam steps, and a QR retraction puts the
    weight back on the manifold. The forward pass is a plain linear layer, with no in-graph
    iteration, and freezing changes nothing. geoopt's matrices are tall (``n ≥ p``, orthonormal
    columns), so a wide layer (``out < in``) stores ``Wᵀ``: the parameter's shape is then
    ``(in, out)``. Lipschitz constant: ``scale · ‖W‖₂ = scale`` up to float rounding (measured,
    as for every layer).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, bias: bool = True) -> None:
        super().__init__()
        import geoopt

        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.transposed = out_features < in_features
        shape = (in_features, out_features) if self.transposed else (out_features, in_features)
        init = torch.empty(shape)
        nn.init.orthogonal_(init)
        self.weight = geoopt.ManifoldParameter(init, manifold=geoopt.EuclideanStiefel())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def effective_weight(self) -> torch.Tensor:
        w = self.weight.as_subclass(torch.Tensor)  # a plain tensor: no manifold bookkeeping downstream
        return w.mT if self.transposed else w

    def orthonormal_weight(self) -> torch.Tensor:
        """The weight, orthonormal by construction (the name ``BjorckLinear`` uses for ``orth(W)``)."""
        return self.effective_weight()


class TorchlipLinear(LipschitzLinear):
    """A layer of deel-torchlip (``pip install lipvae[torchlip]``), by default its
    ``SpectralLinear`` (power-iteration spectral normalisation, then Björck to tolerance
    ``eps_bjorck``), built 1-Lipschitz and scaled by ``scale`` like every ``LipschitzLinear``.

    deel-torchlip's normalisation stops at a tolerance, so ``‖W‖₂`` may exceed 1 slightly:
    certificates use the measured constant ``scale · ‖W‖₂`` of the weight the forward pass uses,
    never the nominal one alone. Freezing stores that weight in a plain layer.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, bias: bool = True,
                 kind: str = "SpectralLinear", **kwargs) -> None:
        super().__init__()
        try:
            from deel import torchlip
        except ImportError:
            raise ImportError(
                "deel-torchlip is not installed: pip install 'lipvae[torchlip]'"
                " (or pip install deel-torchlip), or choose model/layer=bjorck|aol|stiefel"
            ) from None
        self.in_features, self.out_features, self.scale, self.kind = in_features, out_features, float(scale), kind
        self.inner = getattr(torchlip, kind)(in_features, out_features, bias=bias, k_coef_lip=1.0, **kwargs)

    @property
    def weight(self) -> torch.Tensor:  # the raw parameter (device and dtype for ``frozen``)
        return self.inner.parametrizations.weight.original

    @property
    def bias(self) -> torch.Tensor | None:  # the inner layer's, held once (not a second state-dict key)
        return self.inner.bias

    def effective_weight(self) -> torch.Tensor:
        return self.inner.weight

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:.4g}"


#: Lipschitz constant of each activation (Euclidean norm), for ``measured_lipschitz``.
ACTIVATION_LIPSCHITZ: dict[type[nn.Module], float] = {
    GroupSort2: 1.0,
    ChannelGroupSort2: 1.0,
    nn.ReLU: 1.0,
    nn.Identity: 1.0,
    nn.Sigmoid: 0.25,
    # reshapes and the resolution changes of the convolutional networks permute entries
    nn.Flatten: 1.0,
    nn.Unflatten: 1.0,
    nn.PixelShuffle: 1.0,
    nn.PixelUnshuffle: 1.0,
}


def lipschitz_mlp(
    sizes: Sequence[int],
    lipschitz: float,
    layer: Callable[..., LipschitzLinear] = BjorckLinear,
    sigmoid_head: bool = False,
) -> nn.Sequential:
    """An MLP with Lipschitz constant at most ``lipschitz`` (nominal, before the head).

    ``sizes = [n_in, h_1, ..., n_out]``; each of the k linear layers is
    ``layer(n_in, n_out, scale=lipschitz^(1/k))`` (a ``LipschitzLinear``: the model's
    ``model.layer`` group builds the partial, e.g. Björck layers with their iteration count);
    GroupSort2 between layers, so hidden widths must be even (the model schema checks it).
    """
    k = len(sizes) - 1
    scale = lipschitz ** (1.0 / k)
    layers: list[nn.Module] = []
    for i in range(k):
        layers.append(layer(sizes[i], sizes[i + 1], scale=scale))
        if i < k - 1:
            layers.append(GroupSort2())
    if sigmoid_head:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def standard_mlp(sizes: Sequence[int], sigmoid_head: bool = False) -> nn.Sequential:
    """The unconstrained baseline: linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if sigmoid_head:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def freeze(module: nn.Module) -> nn.Module:
    """Replace, in place, every ``LipschitzLinear`` below ``module`` by a plain layer holding
    its frozen weight (a Björck layer's polar factor, an AOL layer's rescaled weight)."""
    for name, child in module.named_children():
        if isinstance(child, LipschitzLinear) or callable(getattr(child, "frozen", None)):
            setattr(module, name, child.frozen())
        else:
            freeze(child)
    return module


def set_bjorck(module: nn.Module, iters: int | None = None, tol: float | None = None) -> None:
    """Set the iteration count (and early-stop tolerance) of every Björck layer."""
    for m in module.modules():
        if isinstance(m, BjorckLinear):
            if iters is not None:
                m.iters = int(iters)
            m.tol = tol


def project_bjorck_(module: nn.Module, iters: int | None = None) -> None:
    """``BjorckLinear.project_`` on every Björck layer below ``module``, with ``iters`` steps
    (None: each layer's own ``project_iters``; a layer with 0 is left alone)."""
    for m in module.modules():
        if isinstance(m, BjorckLinear):
            steps = m.project_iters if iters is None else iters
            if steps:
                m.project_(steps)


def orthonormality_error(module: nn.Module) -> float:
    """``max |σ_i(W) − 1|`` over the layers below ``module`` that are meant to be orthonormal
    (Björck's ``orth(W)``, the Stiefel layers' weights); 0 when there are none."""
    worst = 0.0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (BjorckLinear, StiefelLinear)):
                s = torch.linalg.svdvals(cpu_float64(m.orthonormal_weight()))
                worst = max(worst, float((s - 1).abs().max()))
    return worst


def spectral_norm_exact(w: torch.Tensor) -> float:
    """Largest singular value, in float64 on the CPU."""
    return float(torch.linalg.matrix_norm(cpu_float64(w), ord=2))


#: The sigmoid head's slope at 0, its Lipschitz constant: σ's and g's constants are their
#: bodies' times this. The one place the factor ¼ is written.
SIGMOID_LIPSCHITZ = ACTIVATION_LIPSCHITZ[nn.Sigmoid]


def _chain_bound(net: nn.Module, layer_bound) -> float:
    bound = 1.0
    for m in net.children() if isinstance(net, nn.Sequential) else [net]:
        if isinstance(m, nn.Sequential):
            bound *= _chain_bound(m, layer_bound)
        elif type(m) in ACTIVATION_LIPSCHITZ:
            bound *= ACTIVATION_LIPSCHITZ[type(m)]
        else:
            bound *= layer_bound(m)
    return bound


@torch.no_grad()
def measured_lipschitz(net: nn.Module) -> float:
    """Upper bound ``L̂ = Π_i (scale_i ‖W_i‖₂) · Π(activation constants)`` of a sequential net,
    its head (a final sigmoid) included.

    Uses exactly the weights the forward pass uses (Björck layers at their current
    iteration count), so it is sound where the nominal constant may not be.
    """

    def layer(m: nn.Module) -> float:
        if isinstance(m, LipschitzLinear):
            return m.scale * spectral_norm_exact(m.effective_weight())
        if callable(getattr(m, "measured_constant", None)):  # a layer that knows its exact norm (lipvae.conv)
            return float(m.measured_constant())
        if isinstance(m, nn.Linear):
            return spectral_norm_exact(m.weight)
        raise TypeError(f"measured_lipschitz: no Lipschitz constant known for {type(m).__name__}")

    return _chain_bound(net, layer)


def nominal_lipschitz(net: nn.Module) -> float:
    """The constant a Lipschitz network is built to have, head included: the product of its
    layers' scales (each layer's weight has spectral norm at most 1 by construction) and of its
    activations' constants. ``measured_lipschitz`` should not exceed it."""

    def layer(m: nn.Module) -> float:
        if isinstance(m, LipschitzLinear) or (hasattr(m, "scale") and callable(getattr(m, "frozen", None))):
            return m.scale
        raise TypeError(f"nominal_lipschitz: {type(m).__name__} has no constant by construction")

    return _chain_bound(net, layer)
