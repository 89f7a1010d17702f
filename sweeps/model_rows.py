"""One Markdown table row per run, as docs/reproduction.md's tables of converged models give them:
arm, γ (fixed σ), seed, epochs, evaluated epoch, what stopped training, how much the validation
loss fell over the last three epochs, test log-likelihood, mean certified margin (tight form) and
the share of inputs certified, mean estimated margin, soundness violations, minutes.

    python sweeps/model_rows.py <sweep folder> [<sweep folder> ...]

Minutes are ``timings.total_s`` of results.json: the time after the last resume when the run
was resumed (said in the row); pauses of the machine are not known here and are not subtracted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(record: dict) -> str:
    metrics, config = record.get("metrics") or {}, record.get("config") or {}
    certified, estimated = record.get("certified") or {}, record.get("estimated") or {}
    model = config.get("model") or {}
    lipschitz = model.get("kind") == "lipschitz"
    arm = f"L = {config.get('enc_L'):g}" if lipschitz else "standard"
    if model.get("beta", 1) != 1:
        arm += f", β = {model['beta']:g}"
    std = model.get("encoder_std") or {}
    gamma = f"{std['gamma']:g}" if std.get("mode") == "fixed" else "–"
    losses = (metrics.get("convergence") or {}).get("val_losses") or []
    fell = f"{losses[-4] - losses[-1]:+.2f}" if len(losses) >= 4 else "–"
    minutes = (record.get("timings") or {}).get("total_s", 0) / 60
    resumed = (record.get("run") or {}).get("resumed_from")
    when = f"resumed (epoch {resumed['epoch']}); {minutes:.1f} after" if resumed else f"{minutes:.1f}"

    def number(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    cells = [arm, gamma, config.get("seed"), metrics.get("epochs"), metrics.get("evaluated_epoch"),
             metrics.get("stop_reason"), fell, number(metrics.get("test_log_likelihood"), ".1f"),
             number(certified.get("mean"), ".3f") if lipschitz else "–",
             f"{certified['fraction_certified']:.1%}" if lipschitz and "fraction_certified" in certified else "–",
             number(estimated.get("mean"), ".3f"),
             record.get("soundness_violations") if lipschitz else "–", when]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(folders: list[str]) -> int:
    if not folders:
        print("usage: python sweeps/model_rows.py <sweep folder> [<sweep folder> ...]", file=sys.stderr)
        return 2
    for folder in folders:
        for path in sorted(Path(folder).glob("*/results.json"), key=lambda p: int(p.parent.name.split("_")[0])
                           if p.parent.name.split("_")[0].isdigit() else 0):
            record = json.loads(path.read_text())
            if record.get("status") == "completed":
                print(row(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
