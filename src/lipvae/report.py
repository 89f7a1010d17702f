"""``python -m lipvae.report <run or sweep dir> [more dirs...] [--out DIR]``: a sweep's report.

Reads only the runs' files (``results.json``, ``margins.csv``, the PNGs beside them). Runs
that failed, are missing ``results.json`` or hold a half-written or unreadable one are
listed, never fatal. Writes ``report.md``, a self-contained ``report.html`` (images
embedded), ``results.csv`` and the figures as PNG into ``--out`` (default: the first dir).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lipvae.errors import UserError
from lipvae.plots import plt, save_figure
from lipvae.results import RESULTS_FILE, atomic_write_text, write_table

COLUMNS = [
    "run", "status", "data", "split", "model", "enc_L", "dec_L", "std_mode", "gamma", "beta", "latent_dim",
    "test_log_likelihood", "test_elbo", "certified_mean", "certified_median", "certified_min",
    "fraction_certified", "global_margin", "estimated_mean", "estimated_median", "estimated_min",
    "soundness_violations", "total_s",
]


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run folders below ``dirs``: those Hydra made (``.hydra/``) or holding a results file."""
    runs = set()
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"report: {d} is not a folder")
        for marker in [*d.rglob(".hydra"), *d.rglob(RESULTS_FILE)]:
            runs.add(marker.parent)
    return sorted(runs)


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def load_row(run: Path, root: Path) -> tuple[dict, dict | None]:
    """One table row for a run and its parsed results (None when unusable)."""
    name = str(run.relative_to(root)) if run != root and root in run.parents else run.name
    try:
        r = json.loads((run / RESULTS_FILE).read_text())
    except FileNotFoundError:
        return {"run": name, "status": "missing results.json (killed or still running?)"}, None
    except (OSError, ValueError) as e:
        return {"run": name, "status": f"unreadable results.json ({type(e).__name__})"}, None
    if r.get("status") != "completed":
        return {"run": name, "status": f"failed: {r.get('error', 'unknown error')}"}, None
    cfg = r.get("config", {})
    lip = r.get("lipschitz") or {}
    row = {
        "run": name,
        "status": "completed",
        "data": _get(r, "data", "name"),
        "split": _get(r, "data", "split"),
        "model": _get(r, "model", "kind"),
        "enc_L": _get(lip, "nominal", "encoder_mean") if lip else None,
        "dec_L": _get(lip, "nominal", "decoder") if lip else None,
        "std_mode": _get(r, "model", "encoder_std", "mode"),
        "gamma": _get(r, "model", "encoder_std", "gamma"),
        "beta": _get(r, "model", "beta"),
        "latent_dim": _get(r, "model", "latent_dim"),
        "test_log_likelihood": _get(r, "metrics", "test_log_likelihood"),
        "test_elbo": _get(r, "metrics", "test_elbo"),
        "certified_mean": _get(r, "certified", "mean"),
        "certified_median": _get(r, "certified", "median"),
        "certified_min": _get(r, "certified", "min"),
        "fraction_certified": _get(r, "certified", "fraction_certified"),
        "global_margin": _get(r, "certified", "global_margin"),
        "estimated_mean": _get(r, "estimated", "mean"),
        "estimated_median": _get(r, "estimated", "median"),
        "estimated_min": _get(r, "estimated", "min"),
        "soundness_violations": r.get("soundness_violations"),
        "total_s": _get(r, "timings", "total_s"),
    }
    row["seed"] = cfg.get("seed")
    return row, r


def label(row: dict) -> str:
    if row["model"] != "lipschitz":
        text = "standard"
    else:
        text = f"L={row['enc_L']:g}" + ("" if row["dec_L"] == row["enc_L"] else f"/{row['dec_L']:g}")
    if row.get("std_mode") == "fixed":
        text += f" γ={row['gamma']:g}"
    if row.get("beta") not in (None, 1.0):
        text += f" β={row['beta']:g}"
    if row.get("data") not in (None, "mnist"):
        text += f" ({row['data']})"
    return text


def _margins(run: Path, r: dict) -> pd.DataFrame | None:
    table = _get(r, "estimated", "table")
    if not table or not (run / table).is_file():
        return None
    try:
        return pd.read_csv(run / table)
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def _order(rows: list[dict]) -> list[int]:
    """Lipschitz runs by L, then standard ones: the paper's left-to-right order."""
    return sorted(range(len(rows)), key=lambda i: (rows[i]["model"] != "lipschitz", rows[i]["enc_L"] or 0, label(rows[i])))


def fig_estimated_distributions(rows, margins, path: Path) -> Path | None:
    """Paper Fig. 5 (left): estimated-margin distributions per run."""
    idx = [i for i in _order(rows) if margins[i] is not None]
    if not idx:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(idx) + 1.5), 3.5))
    ax.boxplot([margins[i]["estimated"].to_numpy() for i in idx], showmeans=True)
    ax.set_xticks(range(1, len(idx) + 1), [label(rows[i]) for i in idx], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("estimated margin")
    ax.set_title("estimated (r, p)-robustness margins per input", fontsize=9)
    return save_figure(fig, path)


def fig_likelihood_vs_robustness(rows, path: Path) -> Path | None:
    """Paper Fig. 5 (right): mean test log-likelihood against mean estimated margin."""
    pts = [r for r in rows if r.get("test_log_likelihood") is not None and r.get("estimated_mean") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for r in pts:
        colour = "tab:blue" if r["model"] == "lipschitz" else "tab:red"
        ax.scatter(r["estimated_mean"], r["test_log_likelihood"], c=colour)
        ax.annotate(label(r), (r["estimated_mean"], r["test_log_likelihood"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("mean estimated margin")
    ax.set_ylabel("mean test log-likelihood (nats)")
    ax.set_title("likelihood vs robustness", fontsize=9)
    return save_figure(fig, path)


def fig_certified_vs_estimated(rows, margins, path: Path) -> Path | None:
    """Paper Fig. 4: certified vs estimated per input, all Lipschitz runs, with the diagonal."""
    idx = [i for i in _order(rows) if margins[i] is not None and "certified_tight" in margins[i]]
    if not idx:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    top = 1e-3
    for i in idx:
        m = margins[i]
        ax.scatter(m["estimated"], m["certified_tight"], s=12, alpha=0.7, label=label(rows[i]))
        top = max(top, float(m["estimated"].max()), float(m["certified_tight"].max()))
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", lw=1)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("estimated margin")
    ax.set_ylabel("certified margin (tight)")
    ax.legend(fontsize=7)
    ax.set_title("every point must lie on or below the diagonal", fontsize=9)
    return save_figure(fig, path)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build_report(dirs: list[Path], out: Path | None = None) -> Path:
    dirs = [Path(d) for d in dirs]
    runs = find_runs(dirs)
    if not runs:
        raise UserError(f"report: no runs (folders with .hydra/ or {RESULTS_FILE}) below {', '.join(map(str, dirs))}")
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    root = dirs[0] if len(dirs) == 1 else Path("/")
    loaded = [load_row(run, root) for run in runs]
    good = [(row, r, run) for (row, r), run in zip(loaded, runs) if r is not None]
    problems = [row for row, r in loaded if r is None]
    rows = [row for row, _, _ in good]
    margins = [_margins(run, r) for _, r, run in good]
    frame = pd.DataFrame([*rows, *problems], columns=COLUMNS + ["seed"])
    write_table(out / "results.csv", frame)

    figures = {
        "Estimated margins per run (paper Fig. 5, left)": fig_estimated_distributions(
            rows, margins, out / "estimated_margins.png"
        ),
        "Log-likelihood vs robustness (paper Fig. 5, right)": fig_likelihood_vs_robustness(
            rows, out / "likelihood_vs_robustness.png"
        ),
        "Certified vs estimated margins (paper Fig. 4)": fig_certified_vs_estimated(
            rows, margins, out / "certified_vs_estimated.png"
        ),
    }
    for row, r, run in good:
        if row.get("latent_dim") == 2:
            for name, title in (("aggregate_posterior.png", "aggregate posterior"), ("prior_samples.png", "prior samples")):
                if (run / name).is_file():
                    figures[f"{label(row)}: {title} (paper Fig. {6 if 'posterior' in name else 7})"] = run / name
    figures = {k: v for k, v in figures.items() if v is not None}

    shown = [c for c in COLUMNS if c not in ("run",)]
    md = [f"# lipvae report\n\n{len(rows)} completed run(s), {len(problems)} not usable, from {', '.join(map(str, dirs))}.\n"]
    md.append("| run | " + " | ".join(shown) + " |")
    md.append("|" + "---|" * (len(shown) + 1))
    for i in _order(rows):
        md.append(f"| {rows[i]['run']} | " + " | ".join(_fmt(rows[i].get(c)) for c in shown) + " |")
    if problems:
        md.append("\n## Runs not included\n")
        md += [f"- `{p['run']}`: {p['status']}" for p in problems]
    violations = sum(r.get("soundness_violations") or 0 for r in rows)
    md.append(f"\n**Soundness violations (certified > estimated) over all runs: {violations}.**\n")
    for title, path in figures.items():
        rel = path.name if path.parent == out else str(path)
        md.append(f"## {title}\n\n![{title}]({rel})\n")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    parts = [
        "<!doctype html><meta charset='utf-8'><title>lipvae report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:640px}</style>",
        f"<h1>lipvae report</h1><p>{len(rows)} completed run(s), {len(problems)} not usable.</p>",
        "<table><tr><th>run</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in shown) + "</tr>",
    ]
    for i in _order(rows):
        cells = "".join(f"<td>{html.escape(_fmt(rows[i].get(c)))}</td>" for c in shown)
        parts.append(f"<tr><td>{html.escape(rows[i]['run'])}</td>{cells}</tr>")
    parts.append("</table>")
    if problems:
        parts.append("<h2>Runs not included</h2><ul>")
        parts += [f"<li><code>{html.escape(p['run'])}</code>: {html.escape(p['status'])}</li>" for p in problems]
        parts.append("</ul>")
    parts.append(f"<p><b>Soundness violations over all runs: {violations}.</b></p>")
    for title, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{data}'>")
    atomic_write_text(out / "report.html", "\n".join(parts))
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lipvae.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first dir)")
    args = ap.parse_args(argv)
    try:
        path = build_report(args.dirs, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written: {path} (and report.html, results.csv, figures beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
