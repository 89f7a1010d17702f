"""``python -m lipvae.certify design|model|tightness ...``: certificates before and after training.

design: choose Lipschitz constants and a fixed encoder std γ before training so that every
input gets at least a target certified margin (Theorem 3 and its inverse):

    python -m lipvae.certify design r=8 p=0.5 m=10 target=1.0 [gamma=0.1] [L=5] [form=tight]

model: recompute the certificates of an existing run (a run folder or a checkpoint in it) with
the evaluation pipeline of ``python -m lipvae.evaluate``: the result goes to a new folder under
``<run>/evaluations/`` (``--replace``: into the run itself, the old files kept), and the soundness
check is redone against the stored estimated margins:

    python -m lipvae.certify model outputs/runs/<date>/<time>_<name> [r=8] [p=0.5] [forms=tight,paper] [--replace]

tightness: how far Theorem 1's Markov and χ² terms sit above the Monte Carlo tail they bound,
for every form, at the paper's setting and two others (paper Fig. 2):

    python -m lipvae.certify tightness [out=tightness.png] [samples=100000]

The decoder g and the σ network end in a sigmoid (Lipschitz 1/4), so a configuration with
``dec_L = L`` has ``a = L/4``; ``enc_L = L`` gives ``b = L``. The table is in the
configuration's own terms (enc_L, dec_L, γ).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lipvae.certify.bounds import FORMS, global_margin, max_gamma, max_lipschitz
from lipvae.errors import UserError

DEFAULT_GAMMAS = (0.01, 0.05, 0.1, 0.2)
DEFAULT_LS = (2.0, 5.0, 7.0, 10.0)
USAGE = "\n    ".join(line.strip() for line in __doc__.splitlines() if line.startswith("    python -m lipvae.certify"))


def _parse(args: list[str], allowed: dict[str, type]) -> dict:
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise UserError(f"{arg}: expected key=value with key one of {', '.join(allowed)}")
        kind = allowed[key]
        try:
            if kind is list:
                out[key] = [float(v) for v in value.split(",")]
            elif kind is str:
                out[key] = value
            else:
                out[key] = kind(value)
        except ValueError:
            raise UserError(f"{key}: got {value!r}; accepted: a number (or comma-separated numbers)") from None
    return out


def design(args: list[str]) -> str:
    opts = _parse(
        args, {"r": float, "p": float, "m": int, "target": float, "gamma": list, "L": list, "form": str}
    )
    if "target" not in opts:
        raise UserError("target: missing; give the wanted global margin, e.g. target=1.0")
    r, p, m = opts.get("r", 8.0), opts.get("p", 0.5), opts.get("m", 10)
    target, form = opts["target"], opts.get("form", "tight")
    if form not in FORMS:
        raise UserError(f"form: got {form!r}; accepted: {', '.join(FORMS)}")
    positive = {"target": [target], "r": [r], "gamma": opts.get("gamma", []), "L": opts.get("L", [])}
    for key, values in positive.items():
        for v in values:
            if not (np.isfinite(v) and v > 0):
                raise UserError(f"{key}: got {v:g}; accepted: a positive finite number")
    if not 0 < p < 1:
        raise UserError(f"p: got {p:g}; accepted: a number in (0, 1)")
    if m < 2:
        raise UserError(f"m: got {m}; accepted: an integer >= 2 (the χ² bound)")
    from lipvae.networks import SIGMOID_LIPSCHITZ as SIGMOID  # g's head: a = dec_L · its slope

    try:
        gammas = opts.get("gamma", list(DEFAULT_GAMMAS))
        ls = opts.get("L", list(DEFAULT_LS))
        rows = []
        for gamma in gammas:
            L = max_lipschitz(target, gamma, m=m, r=r, p=p, form=form, decoder_ratio=SIGMOID)
            rows.append(("largest L for γ", L, L, gamma))
        for L in ls:
            gamma = max_gamma(target, SIGMOID * L, L, m=m, r=r, p=p, form=form)
            rows.append(("largest γ for L", L, L, gamma))
    except ValueError as e:
        raise UserError(str(e)) from None
    lines = [
        f"Global certified margin ≥ {target:g} at r={r:g}, p={p:g}, m={m}, {form} form "
        f"(fixed σ ≡ γ; a = dec_L·{SIGMOID:g}, the sigmoid head's slope; b = enc_L):",
        f"{'question':18s} {'enc_L':>10s} {'dec_L':>10s} {'gamma':>10s} {'margin':>10s}  overrides",
    ]
    for question, enc, dec, gamma in rows:
        if enc is None or gamma is None:
            why = f"unreachable: even γ → 0 leaves the margin below r/(ab) = {r / (SIGMOID * enc * enc):.4g}"
            lines.append(f"{question:18s} {enc or 0:10.4g} {dec or 0:10.4g} {'-':>10s} {'-':>10s}  {why}")
            continue
        got = float(global_margin(SIGMOID * dec, enc, gamma=gamma, m=m, r=r, p=p, form=form).margin)
        overrides = (
            f"model=lipschitz enc_L={enc:.6g} dec_L={dec:.6g} model.latent_dim={m} "
            f"model.encoder_std.mode=fixed model.encoder_std.gamma={gamma:.6g}"
        )
        lines.append(f"{question:18s} {enc:10.4g} {dec:10.4g} {gamma:10.4g} {got:10.4g}  {overrides}")
    return "\n".join(lines)


def recertify(path: Path, r=None, p=None, forms=None, num_inputs=None, replace: bool = False) -> dict:
    """``lipvae.certify model``: the evaluation pipeline (``lipvae.evaluate``) with other
    certificate settings. The stored estimated margins are reused when the attack is unchanged,
    so the soundness check is redone against the new certificates. Written to a new folder
    under ``<run>/evaluations/`` (``replace``: into the run, keeping the old files)."""
    from lipvae.evaluate import reevaluate
    from lipvae.stored import load_model

    overrides = []
    for key, value in (("r", r), ("p", p), ("forms", forms)):
        if value:
            overrides.append(f"certify.{key}=[{','.join(map(str, value))}]")
    if num_inputs is not None:  # 0 too: the schema refuses it in one line rather than certifying all
        overrides.append(f"certify.num_inputs={num_inputs}")
    vae, _, run_dir = load_model(path)
    if vae.kind != "lipschitz":
        raise UserError(f"run: {run_dir} is a standard VAE; only Lipschitz VAEs have certificates")
    out, part = reevaluate(Path(path), overrides, replace=replace)
    return {**part["certified"], "written_to": str(out), "soundness_violations": part["soundness_violations"]}


def model(args: list[str]) -> str:
    if not args:
        raise UserError("model: give a run folder or a checkpoint, e.g. outputs/runs/<date>/<time>_<name>")
    replace = "--replace" in args
    opts = _parse([a for a in args[1:] if a != "--replace"], {"r": list, "p": list, "forms": str, "num_inputs": int})
    if "forms" in opts:
        opts["forms"] = opts["forms"].split(",")
    summary = recertify(Path(args[0]), **opts, replace=replace)
    compact = {k: v for k, v in summary.items() if k != "by_r_p_form"}
    return json.dumps(compact, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v))


def tightness(args: list[str]) -> str:
    from lipvae.certify.tightness import save_tightness_figure

    opts = _parse(args, {"out": str, "samples": int})
    samples = opts.get("samples", 100_000)
    if samples < 100:
        raise UserError(f"samples: got {samples}; accepted: an integer >= 100")
    out = Path(opts.get("out", "tightness.png"))
    if not out.parent.is_dir():
        raise UserError(f"out: got {str(out)!r}, whose folder does not exist; accepted: a .png path in an existing folder")
    return f"figure written: {save_tightness_figure(out, samples=samples)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"design": design, "model": model, "tightness": tightness}
    if not argv or argv[0] not in commands:
        print(f"usage:\n    {USAGE}", file=sys.stderr)
        return 2
    try:
        print(commands[argv[0]](argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
