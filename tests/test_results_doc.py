"""docs/results.md is the contract of results.json: every key a run writes is documented there,
and every key documented there is written."""

import json
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"
#: documented keys a completed run does not write (only on failure, or after `evaluate --replace`)
ONLY_SOMETIMES = {"error", "evaluation"}


def _tables() -> dict[str, dict[str, str]]:
    """Each table of results.md (by its section title): first-column keys → the row's text."""
    tables, section = {}, ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip().strip("`")
        elif line.startswith("| `"):
            first, rest = line[1:].split("|", 1)
            for key in re.findall(r"`([^`]+)`", first):
                tables.setdefault(section, {})[key] = rest
    return tables


@pytest.mark.slow
@pytest.mark.parametrize("kind", [("lipschitz", "learned"), ("standard", "fixed")], ids=lambda k: "-".join(k))
def test_every_written_key_is_documented_and_every_documented_key_written(smoke_runs, kind):
    record = json.loads((smoke_runs[kind] / "results.json").read_text())
    tables = _tables()
    top = tables["Top level"]
    assert set(record) <= set(top), set(record) - set(top)
    assert set(top) - ONLY_SOMETIMES <= set(record), set(top) - ONLY_SOMETIMES - set(record)
    # the objects described in one cell: each of their keys is named (in backticks) in it
    for part in ("run", "model", "data", "metrics", "latent_attack", "timings", "lipschitz"):
        value = record[part]
        if value is None:
            continue
        named = set(re.findall(r"`([^`]+)`", top[part]))
        assert set(value) <= named, (part, set(value) - named)
    for part in ("certified", "estimated"):
        if record[part] is None:
            assert kind[0] == "standard" and part == "certified"
            continue
        written, documented = set(record[part]), set(tables[part])
        assert written <= documented, (part, written - documented)
        assert documented - {"coupled"} <= written, (part, documented - {"coupled"} - written)  # coupled: opt-in


def test_the_contract_parser_reads_the_tables():
    """The parser above finds what the document has (a test that can fail when results.md changes shape)."""
    tables = _tables()
    assert {"status", "metrics", "certified", "timings"} <= set(tables["Top level"])
    assert {"r", "p", "form", "mean", "global_margin", "table"} <= set(tables["certified"])
    assert {"method", "censored", "search", "table"} <= set(tables["estimated"])
