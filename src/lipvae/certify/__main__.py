"""``python -m lipvae.certify design|model|tightness ...``: certificates before and after training.

Arguments are Hydra overrides, read as training reads its command line (``key=value``, a list
as ``[a,b]``), with the same one-line errors.

design: choose Lipschitz constants and a fixed encoder std γ before training so that every
input gets at least a target certified margin (Theorem 3 and its inverse):

    python -m lipvae.certify design target=1.0 [r=8] [p=0.5] [m=10] [gamma=[0.1]] [L=[5,7]] [form=tight]

model: recompute the certificates of an existing run (a run folder or a checkpoint in it) with
the evaluation pipeline of ``python -m lipvae.evaluate``: the result goes to a new folder under
``<run>/evaluations/`` (``--replace``: into the run itself, the old files kept), and the soundness
check is redone against the stored estimated margins:

    python -m lipvae.certify model outputs/runs/<date>/<time>_<name> [certify.r=[8]] [certify.forms=[tight,paper]] [--replace]

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
from lipvae.errors import UserError, command

HELP_TERMS = """The arguments:
  target   the certified margin every input must get (design), in input-space Euclidean norm
  r        the reconstruction distance: a reconstruction 'moves' when ‖g(z') − g(z)‖₂ > r (default 8)
  p        the probability with which it must not move (default 0.5)
  m        the latent dimension (default 10)
  gamma    fixed encoder standard deviation(s) γ: a number or a list, e.g. gamma=0.1 or gamma=[0.05,0.1]
  L        Lipschitz constant(s) enc_L = dec_L to tabulate (a number or a list)
  form     which bound: tight (default), paper, exact or cantelli (docs/math.md §3)
  out      tightness: where the figure goes; samples: its Monte Carlo draws
Exit status: 0 done, 2 bad input (one line naming the field)."""
from lipvae.schema import Closed, accepts, check_node, listed, one_of, real

DEFAULT_GAMMAS = (0.01, 0.05, 0.1, 0.2)
DEFAULT_LS = (2.0, 5.0, 7.0, 10.0)
USAGE = "\n    ".join(line.strip() for line in __doc__.splitlines() if line.startswith("    python -m lipvae.certify"))
Finite = real("a positive finite number", gt=0)


class DesignArgs(Closed):
    """``certify design``: the wanted global margin and the certificate's setting."""

    target: Finite
    r: Finite = 8.0
    p: real("a number in (0, 1)", gt=0, lt=1) = 0.5
    m: accepts("an integer >= 2 (the χ² bound)", int, strict=True, ge=2) = 10
    gamma: listed("a list of positive finite numbers, e.g. [0.05,0.1]", Finite) = list(DEFAULT_GAMMAS)
    L: listed("a list of positive finite numbers, e.g. [5,7]", Finite) = list(DEFAULT_LS)
    form: one_of(*FORMS) = "tight"


class TightnessArgs(Closed):
    """``certify tightness``: where the figure goes and the Monte Carlo samples per point."""

    out: accepts("a .png path in an existing folder", str, check=lambda v: Path(v).parent.is_dir()) = "tightness.png"
    samples: accepts("an integer >= 100", int, strict=True, ge=100) = 100_000


def _args(args: list[str], schema: type):
    """The command's ``key=value`` arguments, read by Hydra's grammar as training reads its command
    line (a single value where a list is meant is that list: gamma=0.1 is gamma=[0.1]), checked by
    ``schema``."""
    from lipvae.compose import as_list_where_meant, parse_overrides

    parsed = parse_overrides([as_list_where_meant(a, schema) for a in args], sweeps="refuse")
    return check_node({o.key_or_group: o.value() for _, o in parsed}, schema)


def design(args: list[str]) -> str:
    if not any(a.startswith("target=") for a in args):
        raise UserError("target: missing; give the wanted global margin, e.g. target=1.0")
    opts = _args(args, DesignArgs)
    r, p, m, target, form = opts.r, opts.p, opts.m, opts.target, opts.form
    from lipvae.networks import SIGMOID_LIPSCHITZ as SIGMOID  # g's head: a = dec_L · its slope

    # answers that hold for the trained model: its measured constants may sit above the nominal
    # ones by float rounding (up to LIPSCHITZ_TOLERANCE before a run reports them), so the answers
    # are computed for constants that much larger, and printed rounded down
    from lipvae.certify.certificates import LIPSCHITZ_TOLERANCE as SLACK

    try:
        rows = []
        for gamma in opts.gamma:
            L = max_lipschitz(target, gamma, m=m, r=r, p=p, form=form, decoder_ratio=SIGMOID)
            L = None if L is None else _down(L / (1 + SLACK))
            rows.append(("largest L for γ", L, L, gamma))
        for L in opts.L:
            gamma = max_gamma(target, SIGMOID * L * (1 + SLACK), L * (1 + SLACK), m=m, r=r, p=p, form=form)
            rows.append(("largest γ for L", L, L, None if gamma is None else _down(gamma)))
    except ValueError as e:
        raise UserError(str(e)) from None
    lines = [
        f"Global certified margin ≥ {target:g} at r={r:g}, p={p:g}, m={m}, {form} form "
        f"(fixed σ ≡ γ; a = dec_L·{SIGMOID:g}, the sigmoid head's slope; b = enc_L; each answer holds for"
        f" constants up to {SLACK:g} above these, as a trained model's measured ones may be):",
        f"{'question':18s} {'enc_L':>10s} {'dec_L':>10s} {'gamma':>10s} {'margin':>10s}  overrides",
    ]
    settings = _certificate_overrides(r, p, form)
    for question, enc, dec, gamma in rows:
        if enc is None or gamma is None:
            why = f"unreachable: even γ → 0 leaves the margin below r/(ab) = {r / (SIGMOID * enc * enc):.4g}"
            lines.append(f"{question:18s} {enc or 0:10.4g} {dec or 0:10.4g} {'-':>10s} {'-':>10s}  {why}")
            continue
        got = float(global_margin(SIGMOID * dec, enc, gamma=gamma, m=m, r=r, p=p, form=form).margin)
        overrides = (
            f"model=lipschitz enc_L={enc:.6g} dec_L={dec:.6g} model.latent_dim={m} "
            f"model.encoder_std.mode=fixed model.encoder_std.gamma={gamma:.6g}{settings}"
        )
        lines.append(f"{question:18s} {enc:10.4g} {dec:10.4g} {gamma:10.4g} {got:10.4g}  {overrides}")
    return "\n".join(lines)


def _certificate_overrides(r: float, p: float, form: str) -> str:
    """What a training run needs beyond its defaults to certify (and attack) at this ``r`` and
    ``p`` with ``form`` as its primary form (the one results.json summarises)."""
    from lipvae.safety import packaged_config

    certify, attack = packaged_config("certify", "default.yaml"), packaged_config("attack", "base", "common.yaml")
    out = "" if [r] == certify["r"] and r == attack["r"] else f" certify.r=[{r:g}] attack.r={r:g}"
    out += "" if [p] == certify["p"] and p == attack["p"] else f" certify.p=[{p:g}] attack.p={p:g}"
    return out + ("" if form == certify["forms"][0] else f" certify.forms=[{form}]")


def _down(x: float, digits: int = 6) -> float:
    """``x`` rounded down to ``digits`` significant digits (as the overrides print it)."""
    import math

    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(x))))
    return math.floor(x * scale) / scale


def recertify(path: Path, overrides: list[str] = (), replace: bool = False) -> dict:
    """``lipvae.certify model``: the evaluation pipeline (``lipvae.evaluation``, through ``lipvae.evaluate``) with other
    certificate settings (``certify.*`` and ``margins.certified_inputs`` overrides). The stored estimated margins are reused when
    the attack is unchanged, so the soundness check is redone against the new certificates.
    Written to a new folder under ``<run>/evaluations/`` (``replace``: into the run, keeping the
    old files)."""
    from lipvae.evaluate import reevaluate

    out, part = reevaluate(Path(path), list(overrides), replace=replace, changeable=("certify.", "margins.certified_inputs"),
                            certificates=True)
    return {**part["certified"], "written_to": str(out), "soundness_violations": part["soundness_violations"]}


def model(args: list[str]) -> str:
    if not args:
        raise UserError("model: give a run folder or a checkpoint, e.g. outputs/runs/<date>/<time>_<name>")
    summary = recertify(Path(args[0]), [a for a in args[1:] if a != "--replace"], replace="--replace" in args)
    compact = {k: v for k, v in summary.items() if k != "by_r_p_form"}
    return json.dumps(compact, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v))


def tightness(args: list[str]) -> str:
    from lipvae.certify.tightness import save_tightness_figure

    opts = _args(args, TightnessArgs)
    return f"figure written: {save_tightness_figure(Path(opts.out), samples=opts.samples)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"design": design, "model": model, "tightness": tightness}
    if argv and argv[0] in ("-h", "--help") or argv[1:2] in (["-h"], ["--help"]):
        print(__doc__.replace("``", "`"))
        print(HELP_TERMS)
        return 0
    if not argv or argv[0] not in commands:
        print(f"usage:\n    {USAGE}\n(--help explains each argument)", file=sys.stderr)
        return 2
    return command(lambda: print(commands[argv[0]](argv[1:])) or 0, "copy the run somewhere writable first")


if __name__ == "__main__":
    sys.exit(main())
