"""MLP against convolutional Lipschitz VAEs at the same constants, on Fashion-MNIST's official split.

Each model is one ordinary ``python -m lipvae.train`` run (process start, data, training to early
stopping, testing, certification of all test images in the tight and Cantelli forms, the attack
on the first ``--attacked`` test images), the same stopping rule for every arm: early stopping on
the validation loss with patience ``--patience`` epochs, an epoch counting only when it lowers the best
loss by more than ``--min-delta`` nats (defaults: the reproduction's 5 and 1), at most ``--max-epochs``
epochs, no time limit.
Runs go two at a time with one thread each (the 2-core laptop's best throughput: bench_sweep.py),
so both arms of a constant share the machine alike. Peak memory is each process's maximum
resident set (``/usr/bin/time``). Resumable: a finished run is read back, not trained again, and a
stopped one continues from its last epoch (``resume=auto``); its training minutes are the sum of its
epochs' seconds (results.json's ``timings.epochs_s``: the epochs before a stop included).

    python benchmarks/bench_conv.py [--out benchmarks/results/conv] [--L 5 10]

Prints a Markdown table and writes ``table.md`` and ``reconstructions.png`` (test images and each
model's reconstructions g(μ(x)), side by side) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from timing import machine

ARCHS = {
    "mlp": ["model/arch=mlp", "model.hidden=[256,256]"],
    "conv": ["model/arch=conv", "model.arch.channels=[16,32]"],
}


def run(arch: str, lip: float, args, out: Path) -> dict:
    """Train (or read back) one model; its results.json, wall seconds and peak memory (MiB)."""
    folder = out / f"{arch}_L{lip:g}"
    if (folder / "results.json").is_file() and json.loads((folder / "results.json").read_text())["status"] == "completed":
        return json.loads((folder / "bench.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["/usr/bin/time", "-f", "maxrss_kib=%M", sys.executable, "-m", "lipvae.train", "data=fashion_mnist",
           "data.resplit=false", "model/layer=stiefel", *ARCHS[arch], f"enc_L={lip:g}", "module.lr=1e-3",
           f"trainer.max_epochs={args.max_epochs}", "trainer.max_time=null",
           f"callbacks.early_stopping.patience={args.patience}", f"callbacks.early_stopping.min_delta={args.min_delta:g}",
           "callbacks.finetune.max_epochs=0",
           "certify.forms=[tight,cantelli]", f"margins.attacked_inputs={args.attacked}", "logger=csv",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={folder}", "resume=auto"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{arch} L={lip:g} failed:\n{proc.stderr[-3000:]}")
    rss = [int(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("maxrss_kib=")]
    record = {"arch": arch, "L": lip, "wall_s": wall, "peak_mib": rss[-1] / 1024 if rss else None,
              "results": json.loads((folder / "results.json").read_text())}
    (folder / "bench.json").write_text(json.dumps(record, indent=2))
    return record


def row(rec: dict) -> str:
    r = rec["results"]
    m, by = r["metrics"], r["certified"]["by_r_p_form"]
    key = next(iter(by))
    conv = m.get("convergence") or {}
    return (f"| {rec['arch']} | {rec['L']:g} | {m['test_log_likelihood']:.1f} | {by[key]['tight']['mean']:.3f} | "
            f"{by[key]['cantelli']['mean']:.3f} | {r['estimated']['mean']:.3f} | {r['soundness_violations']} | "
            f"{m['epochs']} ({m['stop_reason']}) | {r['timings'].get('epochs_s', r['timings']['fit_s']) / 60:.1f} | "
            f"{rec['peak_mib']:.0f} | {conv.get('improvement_last_epoch') or float('nan'):.2f} |")


def reconstructions(records: list[dict], out: Path, n: int = 8) -> Path:
    """Test images and each model's reconstruction g(μ(x)), one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lipvae.stored import load_model, rebuild_data

    rows = []
    for rec in records:
        vae, cfg, run_dir = load_model(out / f"{rec['arch']}_L{rec['L']:g}")
        x = rebuild_data(run_dir, cfg).split("test").images[:n]
        if not rows:
            rows.append(("test images", x))
        with torch.no_grad():
            rows.append((f"{rec['arch']}, L={rec['L']:g}", vae.reconstruct(x, sample=False)))
    shape = records[0]["results"]["data"]["input_shape"]  # C x H x W, as results.json records it

    def picture(image):  # an image as imshow takes it: H x W (grey) or H x W x C
        image = image.reshape(shape)
        return image[0] if shape[0] == 1 else image.permute(1, 2, 0)

    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.2 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            axes[r][c].imshow(picture(images[c]), cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    path = out / "reconstructions.png"
    fig.savefig(path, dpi=80)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conv"))
    parser.add_argument("--L", type=float, nargs="+", default=[5.0, 10.0])
    # the reproduction's stopping rule (conf/tier/converged.yaml): 5 epochs without lowering the best
    # validation loss by more than 1 nat; a cap that a converged model does not reach
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--min-delta", type=float, default=1.0)
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--attacked", type=int, default=25)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(arch, lip) for lip in args.L for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes of one thread each
        records = list(pool.map(lambda job: run(*job, args, args.out), jobs))
    header = ("| arch | L | test log-lik. | certified mean (tight) | certified mean (Cantelli) | estimated mean | "
              "violations | epochs (stop) | training min | peak MiB | last-epoch improvement (nats) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    table = "\n".join([f"{machine()}; two runs at a time, one thread each", "", header,
                       *(row(rec) for rec in records)])
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"figure: {reconstructions(records, args.out)}")


if __name__ == "__main__":
    main()
