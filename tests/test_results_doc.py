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


def test_what_the_report_reads_is_documented():
    """The report's fields (its number checks and columns' sources) are keys of the contract: one
    statement of the schema (docs/results.md) that the writer, the typed reader and the report are
    checked against."""
    from lipvae.report import _NUMBERS

    tables = _tables()
    top = tables["Top level"]
    for path, _, _ in _NUMBERS:
        assert path[0] in top, path
        if len(path) > 1:
            documented = set(tables[path[0]]) if path[0] in tables else set(re.findall(r"`([^`]+)`", top[path[0]]))
            assert path[1] in documented, path


def test_the_contract_parser_reads_the_tables():
    """The parser above finds what the document has (a test that can fail when results.md changes shape)."""
    tables = _tables()
    assert {"status", "metrics", "certified", "timings"} <= set(tables["Top level"])
    assert {"r", "p", "form", "mean", "global_margin", "table"} <= set(tables["certified"])
    assert {"method", "censored", "search", "table"} <= set(tables["estimated"])


def test_the_typed_record_has_exactly_the_documented_top_level_keys(tmp_path):
    """lipvae.results.Results, the one writer and reader of results.json, has one field per
    documented top-level key; a record of another version keeps its unknown keys through it."""
    from dataclasses import fields

    from lipvae.results import Results, ResultsError

    assert {f.name for f in fields(Results)} - {"extra"} == set(_tables()["Top level"])
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "future_part": {"x": 1},
                                                       "certified": {"mean": 0.5}}))
    record = Results.read(tmp_path)
    assert record.get("certified", "mean") == 0.5 and record.get("estimated", "mean") is None
    record.write(tmp_path)
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["future_part"] == {"x": 1} and again["schema_version"] is None and "error" not in again
    failed = Results(status="failed", error="boom")
    assert set(failed.as_dict()) == {"schema_version", "status", "error"}
    for text, why in (("[1, 2]", "a JSON list, not an object"), ("{", "JSONDecodeError")):
        (tmp_path / "results.json").write_text(text)
        with pytest.raises(ResultsError, match=re.escape(why)):
            Results.read(tmp_path)
    assert Results.status_of(tmp_path) is None and Results.status_of(tmp_path / "nowhere") is None
    # the run folder's files, named in one place; a training run writes them there
    from lipvae.results import RunFolder

    folder = RunFolder(str(tmp_path))
    assert (folder.results_file, folder.last_checkpoint, folder.config_file) == (
        tmp_path / "results.json", tmp_path / "checkpoints" / "last.ckpt", tmp_path / ".hydra" / "config.yaml")
    failed.write(tmp_path)
    assert folder.status() == "failed" and folder.results().error == "boom"


@pytest.mark.slow
def test_a_finished_run_has_the_files_its_run_folder_names(smoke_runs):
    from lipvae.results import RunFolder

    folder = RunFolder(smoke_runs[("lipschitz", "learned")])
    for path in (folder.results_file, folder.last_checkpoint, folder.frozen_model, folder.config_file, folder.hydra_file):
        assert path.is_file(), path
    assert folder.status() == "completed" and folder.results().get("metrics", "epochs") >= 1
