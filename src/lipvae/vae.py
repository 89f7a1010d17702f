"""The VAE of docs/math.md §1: encoder mean μ, encoder std σ, decoder mean g.

``q(z|x) = N(μ(x), diag σ(x)²)``; ``p(x|z)`` one of the likelihoods below with
mean parameter ``g(z)``; the objective is ``E_q[log p(x|z)] − β·KL(q ‖ N(0, I))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lipvae.networks import BjorckLinear, LipschitzLinear, freeze, lipschitz_mlp, measured_lipschitz, nominal_lipschitz, standard_mlp

_PROB_EPS = 1e-6


@dataclass
class Posterior:
    mean: torch.Tensor
    std: torch.Tensor
    log_std: torch.Tensor

    def sample(self, n: int | None = None) -> torch.Tensor:
        shape = self.mean.shape if n is None else (n, *self.mean.shape)
        return self.mean + self.std * torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)


class VAE(nn.Module):
    """A VAE whose μ, σ and g are either Lipschitz (orthonormal layers + GroupSort) or standard
    networks: MLPs (``arch="mlp"``) or convolution stacks on ``input_shape = (C, H, W)`` images
    (``arch="conv"``, ``lipvae.conv``). Inputs are flat vectors of ``prod(input_shape)`` entries.

    ``std_mode``: ``learned`` (σ = sigmoid(net(x))), ``bounded`` (that σ projected
    onto the ball ``‖σ‖₂ ≤ max_norm``, 1-Lipschitz so the constant still holds) or
    ``fixed`` (σ ≡ γ·1, no network).
    """

    def __init__(
        self,
        kind: str = "lipschitz",
        input_dim: int | None = None,
        latent_dim: int = 10,
        hidden: tuple[int, ...] = (512, 512),
        encoder_mean_L: float = 5.0,
        encoder_std_L: float = 5.0,
        decoder_L: float = 5.0,
        std_mode: str = "learned",
        gamma: float | None = None,
        max_norm: float | None = None,
        likelihood: str = "continuous_bernoulli",
        obs_std: float = 1.0,
        beta: float = 1.0,
        layer: Callable[..., LipschitzLinear] = BjorckLinear,
        input_shape: Sequence[int] | None = None,
        arch: str = "mlp",
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()  # the arguments are checked by the model schema (lipvae.schema.ModelConfig)
        if input_shape is None:
            if input_dim is None:
                raise TypeError("VAE needs the data's input_shape (C, H, W), or input_dim for flat vectors")
            input_shape = (int(input_dim),)
        self.input_shape = tuple(int(s) for s in input_shape)
        input_dim = math.prod(self.input_shape)
        self.kind, self.std_mode, self.likelihood, self.arch = kind, std_mode, likelihood, arch
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.gamma, self.max_norm, self.obs_std, self.beta = gamma, max_norm, obs_std, beta
        self.nominal = {"encoder_mean": encoder_mean_L, "encoder_std": encoder_std_L, "decoder": decoder_L}
        # the data's shape travels with the weights (state dict), so a stored model rebuilds itself
        self.register_buffer("data_shape", torch.tensor(self.input_shape, dtype=torch.int64))
        self.register_load_state_dict_pre_hook(_shape_of_older_weights)

        lipschitz = kind == "lipschitz"
        if arch == "conv":
            from lipvae.conv import conv_decoder, conv_encoder

            def encoder(lip, head):
                return conv_encoder(self.input_shape, channels, latent_dim, lip if lipschitz else None, layer,
                                    kernel_size, sigmoid_head=head)

            def decoder(lip):
                return conv_decoder(latent_dim, self.input_shape, channels, lip if lipschitz else None, layer,
                                    kernel_size)
        else:
            enc_sizes = [input_dim, *hidden, latent_dim]
            dec_sizes = [latent_dim, *hidden, input_dim]

            def mlp(sizes, lip, head):
                if lipschitz:
                    return lipschitz_mlp(sizes, lip, layer=layer, sigmoid_head=head)
                return standard_mlp(sizes, sigmoid_head=head)

            def encoder(lip, head):
                return mlp(enc_sizes, lip, head)

            def decoder(lip):
                return mlp(dec_sizes, lip, True)

        self.encoder_mean = encoder(encoder_mean_L, False)
        # σ and g end in their sigmoid heads, so each network's constant includes its head.
        # ``encode`` runs σ's body alone and applies the sigmoid itself, to take log σ stably.
        self.encoder_std = None if std_mode == "fixed" else encoder(encoder_std_L, True)
        self.decoder = decoder(decoder_L)
        # each network's constant by construction, its head included, kept from before freezing
        self.bound = None
        if lipschitz:
            self.bound = {
                "encoder_mean": nominal_lipschitz(self.encoder_mean),
                "encoder_std": 0.0 if self.encoder_std is None else nominal_lipschitz(self.encoder_std),
                "decoder": nominal_lipschitz(self.decoder),
            }

    @classmethod
    def from_config(
        cls,
        kind: str,
        latent_dim: int,
        hidden: Sequence[int],
        beta: float,
        likelihood: str,
        obs_std: float,
        encoder_std: Mapping,
        lipschitz: Mapping,
        input_shape: Sequence[int],
        layer: Callable[..., LipschitzLinear] | None = None,
        arch: Mapping | None = None,
    ) -> VAE:
        """The VAE of a ``model`` config group, whose fields these arguments are named after
        (``encoder_std``, ``lipschitz`` and ``arch`` are its nested groups; ``layer`` the partial
        that the ``model/layer`` group builds; ``input_shape`` the data's, given by the run). The
        model's ``_target_``."""
        arch = dict(arch or {"kind": "mlp"})
        return cls(
            kind=kind, input_shape=tuple(input_shape), latent_dim=latent_dim, hidden=tuple(hidden), beta=float(beta),
            likelihood=likelihood, obs_std=obs_std, std_mode=encoder_std["mode"], gamma=encoder_std.get("gamma"),
            max_norm=encoder_std.get("max_norm"), encoder_mean_L=float(lipschitz["encoder_mean"]),
            encoder_std_L=float(lipschitz["encoder_std"]), decoder_L=float(lipschitz["decoder"]),
            layer=BjorckLinear if layer is None else layer, arch=arch.get("kind", "mlp"),
            channels=tuple(arch.get("channels") or (32, 64)), kernel_size=int(arch.get("kernel_size") or 3),
        )

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (float64 after training with ``trainer.precision=64-true``); inputs
        and latents are cast to it, so float32 data and draws work with either."""
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor) -> Posterior:
        x = x.to(self.dtype)
        mean = self.encoder_mean(x)
        if self.encoder_std is None:
            std = torch.full_like(mean, self.gamma)
            return Posterior(mean, std, std.log())
        if not isinstance(self.encoder_std[-1], nn.Sigmoid):
            raise TypeError("encoder_std must end in its sigmoid head (nn.Sigmoid), which encode applies itself")
        pre = self.encoder_std[:-1](x)  # the body; its sigmoid head is applied here
        std, log_std = torch.sigmoid(pre), F.logsigmoid(pre)
        if self.std_mode == "bounded":
            norm = std.norm(dim=-1, keepdim=True)
            shrink = torch.clamp(self.max_norm / norm.clamp_min(1e-30), max=1.0)
            std, log_std = std * shrink, log_std + shrink.log()
        return Posterior(mean, std, log_std)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.to(self.dtype))

    def log_likelihood(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``log p(x|z)`` summed over pixels; ``probs = g(z)``, broadcast against ``x``."""
        if self.likelihood == "gaussian":
            var = self.obs_std**2
            return (-0.5 * (x - probs) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(-1)
        probs = probs.clamp(_PROB_EPS, 1 - _PROB_EPS)
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy(probs, x.expand_as(probs), reduction="none").sum(-1)
        log_density = x * probs.log() + (1 - x) * torch.log1p(-probs) + continuous_bernoulli_log_norm(probs)
        return log_density.sum(-1)

    @staticmethod
    def kl(q: Posterior) -> torch.Tensor:
        """``KL(N(μ, σ²) ‖ N(0, I))`` summed over latent dimensions."""
        return 0.5 * (q.mean**2 + q.std**2 - 1.0 - 2.0 * q.log_std).sum(-1)

    def elbo(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-input ELBO (β-weighted), reconstruction term and KL, one sample of z."""
        q = self.encode(x)
        rec = self.log_likelihood(x, self.decode(q.sample()))
        kl = self.kl(q)
        return {"elbo": rec - self.beta * kl, "rec": rec, "kl": kl}

    @torch.no_grad()
    def importance_log_likelihood(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``log p(x) ≈ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x)``, ``z_k ~ q(·|x)`` (IWAE)."""
        q = self.encode(x)
        z = q.sample(num_samples)  # K × B × m
        log_px_z = self.log_likelihood(x, self.decode(z))
        log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        eps = (z - q.mean) / q.std
        log_qz = (-0.5 * eps**2 - q.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(log_px_z + log_pz - log_qz, dim=0) - math.log(num_samples)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        q = self.encode(x)
        return self.decode(q.sample() if sample else q.mean)

    def freeze(self) -> VAE:
        """Replace Björck layers by their converged (polar) weights; a no-op for a standard VAE."""
        freeze(self)
        return self

    def lipschitz_constants(self) -> dict[str, dict[str, float] | None]:
        """``a = Lip(g)``, ``b = Lip(μ)``, ``c = Lip(σ)`` (docs/math.md §1), sigmoid heads included.

        ``nominal``: the constants asked for (the L of each network, before its head);
        ``bound``: each network's constant by construction, its head included;
        ``measured``: each network's bound from the weights it runs with (the certificates use
        these). With fixed σ, c = 0.
        """
        if self.kind != "lipschitz":
            return {"nominal": None, "bound": None, "measured": None}
        nominal = dict(self.nominal)
        if self.encoder_std is None:
            nominal["encoder_std"] = 0.0
        measured = {
            "encoder_mean": measured_lipschitz(self.encoder_mean),
            "encoder_std": 0.0 if self.encoder_std is None else measured_lipschitz(self.encoder_std),
            "decoder": measured_lipschitz(self.decoder),
        }
        return {"nominal": nominal, "bound": dict(self.bound), "measured": measured}


def _shape_of_older_weights(module, state_dict, prefix, *args) -> None:
    """Weights saved before the data's shape was part of the state dict take the model's own."""
    state_dict.setdefault(prefix + "data_shape", module.data_shape.clone())


def stored_input_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The data shape a VAE's state dict was saved with (``data_shape``; keys may carry a
    Lightning module's ``vae.`` prefix); None for weights saved before it was recorded."""
    for key in ("data_shape", "vae.data_shape"):
        if key in state:
            return tuple(int(v) for v in state[key].tolist())
    return None


def continuous_bernoulli_log_norm(lam: torch.Tensor) -> torch.Tensor:
    """``log C(λ)`` of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019),
    ``C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ)``, ``C(½) = 2``; a Taylor series near λ = ½,
    ``artanh(d)/d = 1 + d²/3 + d⁴/5 + d⁶/7 + …``, where the quotient loses precision."""
    d = 1 - 2 * lam
    far = d.abs() > 1e-2
    safe = torch.where(far, d, torch.full_like(d, 0.5))
    exact = torch.log(2 * torch.atanh(safe) / safe)
    d2 = d * d
    taylor = math.log(2.0) + torch.log1p(d2 / 3 + d2 * d2 / 5 + d2**3 / 7)
    return torch.where(far, exact, taylor)

