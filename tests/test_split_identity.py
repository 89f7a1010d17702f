"""A run's data split is recorded exactly and a re-evaluation rebuilds it from the record
(issue 27): never from today's files, defaults or the re-evaluation's seed."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import synthetic_digits, write_idx
from lipvae.data import ImageDataModule
from lipvae.errors import UserError
from lipvae.stored import rebuild_data


def _test_only(folder):
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_digits(200, 2)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    return folder


def _add_training_file(folder):
    images, labels = synthetic_digits(300, 1)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)


def _run(tmp_path, folder, seed=0, record=None):
    """A run folder trained (as far as data goes) with data.resplit=auto when only the test file existed."""
    data = dict(_target_="lipvae.data.ImageDataModule", name="mnist", root=str(folder), batch_size=32,
                eval_batch_size=100, val_fraction=0.1, resplit="auto", resplit_test_fraction=0.2, limit=None,
                download=False)
    dm = ImageDataModule(**{k: v for k, v in data.items() if k != "_target_"}, seed=seed)
    dm.setup()
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"seed": seed, "data": data}))
    info = dm.info.as_dict() if record is None else record(dm.info.as_dict())
    (run / "results.json").write_text(json.dumps({"status": "completed", "data": info}))
    return run, dm, OmegaConf.create({"seed": seed, "data": data})


def test_a_test_split_run_re_evaluates_on_its_own_inputs_after_the_training_file_appears(tmp_path):
    folder = _test_only(tmp_path / "mnist")
    run, dm, cfg = _run(tmp_path, folder)
    assert dm.info.split == "resplit-test" and dm.info.num_test == 40
    _add_training_file(folder)
    today = ImageDataModule(name="mnist", root=str(folder), resplit="auto", download=False, seed=0)
    today.setup()
    assert today.info.split == "official"  # what today's defaults would test on: the whole test file
    cfg.seed = 7  # a re-evaluation's seed= seeds the attack, never the split
    again = rebuild_data(run, cfg)
    assert again.info.split == "resplit-test"
    assert again.split("test").index.tolist() == dm.split("test").index.tolist()
    assert again.split("train").index.tolist() == dm.split("train").index.tolist()


def test_a_run_recorded_before_the_digests_uses_its_split_kind_and_training_seed(tmp_path):
    folder = _test_only(tmp_path / "mnist")
    old = lambda info: {k: info[k] for k in ("name", "split", "num_train", "num_val", "num_test", "folder")}  # noqa: E731
    run, dm, cfg = _run(tmp_path, folder, seed=3, record=old)
    _add_training_file(folder)
    cfg.seed = 0
    assert rebuild_data(run, cfg).split("test").index.tolist() == dm.split("test").index.tolist()


def test_changed_source_files_are_one_line(tmp_path):
    folder = _test_only(tmp_path / "mnist")
    run, dm, cfg = _run(tmp_path, folder)
    images, labels = synthetic_digits(200, 99)  # other images under the same name
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(UserError, match=r"^data: .* mnist/test file that differs from the one the run read"):
        rebuild_data(run, cfg)


def test_a_rebuilt_division_that_differs_is_refused(tmp_path):
    folder = _test_only(tmp_path / "mnist")
    run, dm, cfg = _run(tmp_path, folder)
    record = json.loads((run / "results.json").read_text())
    record["data"]["indices"] = "0" * 16  # as if the run had been divided otherwise
    (run / "results.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="division cannot be rebuilt"):
        rebuild_data(run, cfg)
    shutil.rmtree(folder)
    with pytest.raises(UserError, match="^data.root: got .* which does not exist"):
        rebuild_data(run, cfg)
