"""Estimated-margin speed: lipvae's batched attack against the reference procedure, whole.

The reference (``attack=lbfgs``, ``lipvae.attack.lbfgs_margins``: the paper's, after Camuto et
al. 2020): one image at a time, SciPy L-BFGS-B with the authors' settings (m = 100, factr = 10,
pgtol = 1e-20) maximising ‖g(μ(x+δ)) − g(μ(x))‖ over the sphere ‖δ‖ = t cut by the pixel box,
up to 5 restarts at every radius of the descending grid 10, 9.5, …, 0.5, 40 Monte Carlo pairs
per δ. It is run in full on ``--reference-images`` images, in its fastest form on this machine:
one image per core at once (``--workers``, default: every core), each process on one thread
(batch-1 work runs 2–3 times slower on two threads than on one). Its time per image is the
mean one-thread time of an image divided by the workers: the pool's throughput with no core
ever idle, which favours the reference (the wall time, with idle cores at the end, is printed
too). It is run once (many minutes per image); its spread is the per-image times it prints.

lipvae (``attack=pgd``): all inputs and starts in one batch, projected gradient ascent, and a
bisection on the radius (tolerance 0.05), whose radii after an input's first start from the δ
found at the previous one (``attack.warm_steps``, default 40 steps; ``cold``: random starts and
100 steps at every radius); eager and with ``attack.compile=true``, each the median of
``--repeats`` runs after a warm-up (the compiler's one-off time is printed apart). Same model,
same first images, same process.

    python benchmarks/bench_attack.py [--inputs 5] [--repeats 3] [--reference-images 5] [--warm-steps 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from lipvae.attack import estimate_margins, lbfgs_margins
from lipvae.data import ImageDataModule
from timing import MNIST_SHAPE, cores, machine, timed

R, P, SAMPLES, STARTS, MAX_RADIUS, GRID_STEP = 8.0, 0.5, 40, 5, 10.0, 0.5


def trained_model(run: str | None, epochs: int):
    if run:
        from lipvae.stored import load_model

        return load_model(Path(run))[0]
    import lightning as L

    from lipvae.lightning.module import VAEModule
    from lipvae.vae import VAE

    L.seed_everything(0, verbose=False)
    dm = ImageDataModule(resplit=True)
    vae = VAE(input_shape=MNIST_SHAPE)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(VAEModule(vae, lr=1e-3), train_dataloaders=dm.train_dataloader())
    return vae.freeze().eval()


_WORKER_MODEL = None


def _worker_init(model_path: str) -> None:
    global _WORKER_MODEL
    torch.set_num_threads(1)
    _WORKER_MODEL = torch.load(model_path, weights_only=False)


def _reference_image(i: int, x: torch.Tensor) -> tuple[int, float, float, bool]:
    """The whole reference procedure on one image: (index, seconds, margin, censored)."""
    start = time.perf_counter()
    est = lbfgs_margins(_WORKER_MODEL, x[None], r=R, p=P, samples=SAMPLES, starts=STARTS, max_radius=MAX_RADIUS,
                        grid_step=GRID_STEP, progress=False, generator=torch.Generator().manual_seed(i), seed=i)
    return i, time.perf_counter() - start, est.margin.item(), bool(est.censored.item())


def reference(vae, x: torch.Tensor, workers: int) -> tuple[float, list[tuple[int, float, float, bool]]]:
    """The pool's wall time and, per image, (index, seconds, margin, censored)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "vae.pt")
        torch.save(vae, path)
        start = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(path,)) as pool:
            futures = [pool.submit(_reference_image, i, xi) for i, xi in enumerate(x)]
            rows = []
            for f in futures:
                rows.append(f.result())
                i, sec, margin, _ = rows[-1]
                print(f"reference: image {i + 1}/{len(x)}: {sec:.1f} s on one thread, margin {margin:g}", flush=True)
        return time.perf_counter() - start, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-images", type=int, default=5, help="images the whole reference procedure runs on")
    ap.add_argument("--workers", type=int, default=None, help="reference processes at once (default: every core)")
    ap.add_argument("--run", default=None, help="a trained run's folder (default: train 2 epochs here)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warm-steps", type=int, default=40, help="lipvae's attack.warm_steps (conf/attack/pgd.yaml)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.inputs < 5:
        raise SystemExit(f"error: --inputs: got {args.inputs}; accepted: an integer >= 5 (fixed costs dominate fewer)")
    if not 1 <= args.reference_images <= 25:
        raise SystemExit(f"error: --reference-images: got {args.reference_images}; accepted: an integer in [1, 25]")
    workers = args.workers or cores()
    vae = trained_model(args.run, args.epochs)
    test = ImageDataModule(resplit=True).split("test").images
    x, x25, xref = test[: args.inputs], test[:25], test[: args.reference_images]
    print(machine(), flush=True)

    def ours(inputs, compile=False, warm=args.warm_steps):
        return lambda: estimate_margins(vae, inputs, r=R, p=P, samples=SAMPLES, starts=STARTS,
                                        generator=torch.Generator().manual_seed(0), progress=False, compile=compile,
                                        warm_steps=warm)

    start = time.perf_counter()
    ours(x[:1], compile=True)()  # the compiler's one-off cost, apart from the timed runs
    compile_s = time.perf_counter() - start
    print(f"torch.compile, first search (compilation included): {compile_s:.1f} s", flush=True)
    timings = {}
    for label, inputs, comp, warm in [("cold eager", x, False, 0), ("eager", x, False, args.warm_steps),
                                      ("compiled", x, True, args.warm_steps), ("cold eager", x25, False, 0),
                                      ("eager", x25, False, args.warm_steps), ("compiled", x25, True, args.warm_steps)]:
        t, est = timed(ours(inputs, comp, warm), repeats=args.repeats)
        timings[(label, len(inputs))] = (t, est)
        print(f"lipvae {label}, {len(inputs)} images: {t}, mean margin {est.margin.mean().item():.4f}", flush=True)

    wall, rows = reference(vae, xref, workers)
    ref_per_image = sum(r[1] for r in rows) / len(rows) / workers
    ref_margin = sum(r[2] for r in rows) / len(rows)
    ours_on_ref = timings[("compiled", 25)][1].margin[: len(xref)].mean().item()
    result = {
        "machine": machine(), "r": R, "p": P, "samples": SAMPLES, "starts": STARTS, "warm_steps": args.warm_steps,
        "compile_first_search_s": compile_s,
        "reference_images": len(xref), "reference_workers": workers, "reference_wall_s": wall,
        "reference_per_image_s": ref_per_image, "reference_image_s_one_thread": [r[1] for r in rows],
        "reference_margins": [r[2] for r in rows], "reference_mean_margin": ref_margin,
        "lipvae_mean_margin_on_reference_images": ours_on_ref,
        "lipvae": {f"{label.replace(' ', '_')}_{n}": {"runs_s": t.runs, "median_s": t.median, "per_image_s": t.median / n,
                                    "mean_margin": est.margin.mean().item(),
                                    "speedup": ref_per_image / (t.median / n)}
                   for (label, n), (t, est) in timings.items()},
    }
    print(f"\nMNIST test images, r={R}, p={P}, {SAMPLES} samples x {STARTS} starts")
    print(f"{'method':52s} {'s/image':>9s} {'mean margin':>12s} {'speed-up':>9s}")
    print(f"{f'reference, whole, {len(xref)} images, {workers} at once':52s} {ref_per_image:9.2f} {ref_margin:12.4f} "
          f"{'1x':>9s}")
    for (label, n), (t, est) in timings.items():
        name = f"lipvae {label}, {n} images ({min(t.runs):.1f}-{max(t.runs):.1f} s)"
        print(f"{name:52s} {t.median / n:9.3f} {est.margin.mean().item():12.4f} {ref_per_image / (t.median / n):8.0f}x")
    print(f"reference per image on one thread: {', '.join(f'{r[1]:.0f} s' for r in rows)}; "
          f"wall {wall:.0f} s for {len(xref)} images")
    print(f"on the reference's {len(xref)} images: reference mean margin {ref_margin:.4f}, lipvae {ours_on_ref:.4f} "
          f"(lower: a stronger attack)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
