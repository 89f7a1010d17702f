"""Time to certify 10,000 inputs with a paper-sized frozen Lipschitz VAE (all three forms),
and the paper setup's global margins (r=8, p=0.5, m=10, γ=0.1, a=b=10) in each form.

    python benchmarks/bench_certify.py [--inputs 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lipvae.certify.bounds import FORMS, global_margin
from lipvae.certify.certificates import certify
from lipvae.vae import VAE
from timing import machine, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(machine())
    print("paper setup global margins (r=8, p=0.5, m=10, γ=0.1, a=b=10):")
    for form in FORMS:
        g = global_margin(10.0, 10.0, gamma=0.1, m=10, r=8.0, p=0.5, form=form)
        print(f"  {form:6s} {float(g.margin):.6f}  (R_M {float(g.markov):.6f}, R_chi2 {float(g.chi2):.6f})")
    x = torch.rand(args.inputs, 784)
    for mode in ("learned", "fixed"):
        vae = VAE(std_mode=mode, gamma=0.1).freeze().eval()
        constants = vae.lipschitz_constants()

        def run():
            return certify(vae, x, np.arange(len(x)), np.zeros(len(x), dtype=int), constants, [8.0], [0.5], list(FORMS))

        timing, (table, summary) = timed(run, repeats=args.repeats)
        print(
            f"σ {mode:7s}: certified {len(table)} inputs x 3 forms in {timing} "
            f"({len(table) / timing.median:,.0f} inputs/s); mean tight margin {summary['mean']:.4f}"
        )


if __name__ == "__main__":
    main()
