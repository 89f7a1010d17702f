"""What the Stiefel layer's optimiser spends and what each cheaper variant buys (Speed IV).

Each variant trains the paper's networks (784-512-512-10, learned σ, L = 5) from the same initial
weights on the same batches of the official MNIST split, and is judged every ``steps/4`` steps by
the frozen validation ELBO on the first 2,000 validation images after an exact retraction:

- ``tangent_projection``: project each gradient onto the tangent space before Adam's step;
- ``retract_every``: retract after every k-th step only (and before every evaluation).

``--drift`` instead measures how far the weights leave the manifold between retractions: the
largest |σᵢ(W) − 1| over the layers just before each retraction, per 300 steps.

    python benchmarks/bench_stiefel.py [--steps 800] [--lr 1e-4 1e-3] [--variants 1:1 0:1 1:4 0:4]
    python benchmarks/bench_stiefel.py --drift --retract-every 4 --lr 1e-3 --hidden 256
    python benchmarks/bench_stiefel.py --profile
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_train import batches, frozen_val_elbo, train_steps
from lipvae.data import ImageDataModule
from lipvae.lightning.module import StiefelAdam
from lipvae.networks import StiefelLinear, orthonormality_error
from lipvae.vae import VAE
from timing import MNIST_SHAPE, machine


def variants(args, x_train, x_val) -> None:
    for lr in args.lr:
        for spec in args.variants:
            project, every = spec.split(":")
            torch.manual_seed(0)
            vae = VAE(input_shape=MNIST_SHAPE, layer=StiefelLinear, hidden=[args.hidden] * 2)
            opt = StiefelAdam(vae.parameters(), lr=lr, tangent_projection=project == "1", retract_every=int(every))
            data = batches(x_train, 128, torch.Generator().manual_seed(1))
            trained, curve = 0.0, []
            for step in range(1, args.steps + 1):
                start = time.perf_counter()
                train_steps(vae, opt, data, 1)
                trained += time.perf_counter() - start
                if step % (args.steps // 4) == 0:
                    opt.retract()
                    curve.append({"step": step, "seconds": round(trained, 1),
                                  "val_elbo": round(frozen_val_elbo(vae, x_val), 2),
                                  "max_sigma_error": float(f"{orthonormality_error(vae):.1e}")})
            print(json.dumps({"lr": lr, "tangent_projection": project == "1", "retract_every": int(every),
                              "seconds_per_step": round(trained / args.steps, 4), "curve": curve}), flush=True)


def drift(args, x_train) -> None:
    for lr in args.lr:
        torch.manual_seed(0)
        vae = VAE(input_shape=MNIST_SHAPE, layer=StiefelLinear, hidden=[args.hidden] * 2)
        k = args.retract_every
        opt = StiefelAdam(vae.parameters(), lr=lr, retract_every=k)
        data = batches(x_train, 128, torch.Generator().manual_seed(1))
        worst = []
        for step in range(1, args.steps + 1):
            train_steps(vae, opt, data, 1)
            if k == 1 or step % k == k - 1:  # the last step before a retraction
                worst.append(orthonormality_error(vae))
            if step % 300 == 0:
                print(f"lr {lr:g}, hidden {args.hidden}, retract every {k}: steps {step - 299}-{step}: largest"
                      f" |sigma - 1| before a retraction {max(worst):.4f}, mean {sum(worst) / len(worst):.4f}",
                      flush=True)
                worst = []


def profile(args, x_train) -> None:
    """One step's parts on one thread, each the median of 15: forward and backward, the tangent
    projection, the retraction, and Adam's element-wise update (default, foreach, fused)."""
    from lipvae.lightning.module import qr_retract

    torch.set_num_threads(1)

    def median(fn, n=15):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[n // 2] * 1e3

    torch.manual_seed(0)
    vae = VAE(input_shape=MNIST_SHAPE, layer=StiefelLinear, hidden=[args.hidden] * 2)
    x = x_train[:128]

    def forward_backward():
        vae.zero_grad()
        (-vae.elbo(x)["elbo"].mean()).backward()

    forward_backward()
    manifold = [p for p in vae.parameters() if hasattr(p, "manifold")]
    parts = {"forward and backward": median(forward_backward),
             "tangent projection": median(lambda: [p.manifold.egrad2rgrad(p, p.grad) for p in manifold]),
             "retraction": median(lambda: [qr_retract(p.detach()) for p in manifold])}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in vae.parameters()]
    for c, p in zip(copies, vae.parameters()):
        c.grad = p.grad.clone()
    for how in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        adam = torch.optim.Adam(copies, lr=1e-4, **how)
        adam.step()
        parts[f"Adam update {how}"] = median(adam.step)
    print(f"one thread, hidden {args.hidden}: " + "; ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    ap.add_argument("--variants", nargs="+", default=["1:1", "0:1", "1:4", "0:4"],
                    help="tangent_projection (1/0) : retract_every")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--drift", action="store_true")
    ap.add_argument("--retract-every", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="time one step's parts on one thread")
    args = ap.parse_args()
    torch.set_num_threads(2)
    dm = ImageDataModule()
    dm.setup()
    print(machine())
    x_train, x_val = dm.split("train").images, dm.split("val").images[:2000]
    if args.profile:
        profile(args, x_train)
    elif args.drift:
        drift(args, x_train)
    else:
        variants(args, x_train, x_val)


if __name__ == "__main__":
    main()
