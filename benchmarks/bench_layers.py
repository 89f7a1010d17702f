"""The Lipschitz layers on one benchmark: lipvae's Björck layer (its default: one in-graph
iteration plus a 2-step projection after every optimiser step), the iteration-free AOL layer,
the Stiefel-manifold layer (geoopt weights trained by lipvae.lightning.module.StiefelAdam) and
deel-torchlip's SpectralLinear.

Every layer trains the same VAE (μ, σ, g: 3-layer MLPs, hidden widths ``--hidden``, latent 10,
GroupSort2, continuous Bernoulli ELBO, encoder and decoder constants L = ``--L``, learning rate
``--lr``, batch 128, the same seed and batches) on the MNIST training split, and is measured on:
- step time: the median over ``--repeats`` fresh models of the mean time of ``--steps`` steps;
- validation ELBO of the *frozen* model (what certificates judge) after equal wall-clock
  budgets of training (``--budgets`` in minutes; evaluation time excluded);
- after the last budget: the measured Lipschitz constants, the certified mean margin (tight
  form, r = 8, p = 0.5) on the test split and the attack's estimated mean margin on its first
  ``--attack-inputs`` test images (lipvae's evaluation pipeline, soundness check included).

The layers run in separate processes, ``--jobs`` at a time, each with cores // jobs threads, so
two layers running side by side see the same machine.

    python benchmarks/bench_layers.py [--budgets 2 5 10] [--jobs 2] [--layers bjorck aol stiefel torchlip]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from bench_train import batches, frozen_val_elbo, step_time, train_steps
from timing import MNIST_SHAPE, cores, machine

LAYERS = ("bjorck", "aol", "stiefel", "torchlip")


def make_layer(name: str):
    """The layer partial and the number of projection steps after each optimiser step."""
    from lipvae.networks import AOLLinear, BjorckLinear, StiefelLinear, TorchlipLinear

    return {
        "bjorck": (partial(BjorckLinear, iters=1), 2),  # conf/model/lipschitz.yaml's defaults
        "aol": (AOLLinear, 0),
        "stiefel": (StiefelLinear, 0),
        "torchlip": (TorchlipLinear, 0),
    }[name]


def make_vae(name: str, hidden: tuple[int, ...], lip: float):
    from lipvae.vae import VAE

    layer, project = make_layer(name)
    return VAE(input_shape=MNIST_SHAPE, hidden=hidden, encoder_mean_L=lip, encoder_std_L=lip, decoder_L=lip, layer=layer), project


def evaluation_config(attack_inputs: int):
    from hydra import compose, initialize_config_module

    import lipvae.schema  # noqa: F401  (registers the config schemas)

    with initialize_config_module(config_module="lipvae.conf", version_base="1.3"):
        return compose("config", overrides=[f"margins.attacked_inputs={attack_inputs}", "attack.warm_steps=0",
                                            "logger=csv"])


def measure(name: str, args: argparse.Namespace, threads: int) -> dict:
    """Everything measured for one layer, in this (child) process."""
    from lipvae.data import ImageDataModule
    from lipvae.evaluate import evaluate
    from lipvae.lightning.module import make_optimizer

    torch.set_num_threads(threads)
    hidden = tuple(args.hidden)
    dm = ImageDataModule(resplit=False)
    dm.setup()
    x_train, x_val = dm.split("train").images, dm.split("val").images
    step_times = []
    for repeat in range(args.repeats):
        torch.manual_seed(repeat)
        vae, project = make_vae(name, hidden, args.L)
        step_times.append(step_time(vae, x_train, args.steps, project))

    torch.manual_seed(0)
    vae, project = make_vae(name, hidden, args.L)
    opt = make_optimizer(vae.parameters(), args.lr)
    data = batches(x_train, 128, torch.Generator().manual_seed(1))
    curve, trained, steps = [], 0.0, 0
    for budget in sorted(args.budgets):
        while trained < budget * 60:
            start = time.perf_counter()
            train_steps(vae, opt, data, 1, project)
            trained += time.perf_counter() - start
            steps += 1
        curve.append({"minutes": budget, "steps": steps, "val_elbo": frozen_val_elbo(vae, x_val)})
        print(f"{name}: {budget} min, {steps} steps, frozen val ELBO {curve[-1]['val_elbo']:.2f}", flush=True)

    vae.freeze().eval()
    cfg = evaluation_config(args.attack_inputs)
    with tempfile.TemporaryDirectory() as folder:
        ev = evaluate(vae, dm.split("test"), cfg, Path(folder), seed=0, progress=False)
    constants = vae.lipschitz_constants()
    return {
        "layer": name, "threads": threads, "step_s": step_times, "curve": curve,
        "measured": constants["measured"], "nominal": constants["nominal"],
        "certified_mean": ev.certified["mean"], "fraction_certified": ev.certified["fraction_certified"],
        "estimated_mean": ev.estimated["mean"], "estimated_inputs": ev.estimated["num_inputs"],
        "violations": ev.soundness_violations,
    }


def _child(name: str, args: argparse.Namespace, threads: int, queue) -> None:
    try:
        queue.put(measure(name, args, threads))
    except ImportError as e:
        queue.put({"layer": name, "skipped": str(e)})


def table(rows: list[dict], budgets: list[float]) -> str:
    base = next((statistics.median(r["step_s"]) for r in rows if r["layer"] == "bjorck" and "step_s" in r), None)
    head = ["layer", "s/step (median)", "vs Björck", *[f"val ELBO {b:g} min (steps)" for b in budgets],
            "measured L̂ (μ, σ, g)", "certified mean (%)", "estimated mean", "violations"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['layer']} | skipped: {r['skipped']} |")
            continue
        t = statistics.median(r["step_s"])
        m = r["measured"]
        cells = [r["layer"], f"{t:.3f}", f"{base / t:.2f}×" if base else "",
                 *[f"{c['val_elbo']:.1f} ({c['steps']})" for c in r["curve"]],
                 f"{m['encoder_mean']:.4f}, {m['encoder_std']:.4f}, {m['decoder']:.4f}",
                 f"{r['certified_mean']:.3f} ({100 * r['fraction_certified']:.0f} %)",
                 f"{r['estimated_mean']:.3f}", str(r["violations"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    ap.add_argument("--budgets", nargs="+", type=float, default=[2, 5, 10], help="minutes of training")
    ap.add_argument("--hidden", nargs="+", type=int, default=[512, 512])
    ap.add_argument("--L", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per step-time repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attack-inputs", type=int, default=25)
    ap.add_argument("--jobs", type=int, default=2, help="layers measured side by side")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = max(1, cores() // args.jobs)
    print(machine())
    print(f"{args.jobs} layers at a time, {threads} thread(s) each; hidden {args.hidden}, L = {args.L:g}, "
          f"lr {args.lr:g}, batch 128, budgets {args.budgets} min", flush=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    pending, running, rows = list(args.layers), {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            running[name] = ctx.Process(target=_child, args=(name, args, threads, queue))
            running[name].start()
        rows.append(queue.get())
        running.pop(rows[-1]["layer"]).join()
    rows.sort(key=lambda r: args.layers.index(r["layer"]))
    print(table(rows, sorted(args.budgets)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
