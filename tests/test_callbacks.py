"""lipvae's margins as Lightning callbacks in a plain Trainer, outside lipvae.train."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lipvae.lightning.margins import CertifiedMargins, EstimatedMargins, default_margins
from lipvae.certify.certificates import certify_test_split
from lipvae.data import ImageDataModule
from lipvae.errors import UserError
from lipvae.lightning.module import VAEModule
from lipvae.networks import AOLLinear, LipschitzLinear
from lipvae.vae import VAE

ATTACK = {"num_inputs": 4, "samples": 10, "starts": 1, "steps": 10, "tol": 0.2,
          "latent": {**default_margins()["latent"], "num_inputs": 2, "steps": 5}}


def tiny_vae() -> VAE:
    return VAE(kind="lipschitz", input_shape=(1, 28, 28), hidden=(16, 16), latent_dim=4, encoder_mean_L=3.0, encoder_std_L=3.0, decoder_L=3.0)


@pytest.mark.slow
def test_margin_callbacks_in_a_plain_trainer_write_sound_margins_of_the_best_frozen_model(tmp_path, synthetic_root):
    L.seed_everything(0, verbose=False)
    data = ImageDataModule(root=str(synthetic_root / "mnist"), limit=300, batch_size=50, eval_batch_size=100,
                           resplit=True)
    module = VAEModule(tiny_vae(), lr=1e-3, num_importance=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=1)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[
                            checkpoint, CertifiedMargins(r=[8.0], p=[0.5], forms=["tight", "paper"]),
                            EstimatedMargins(attack=ATTACK),
                        ])
    trainer.fit(module, datamodule=data)

    record = json.loads((tmp_path / "evaluation.json").read_text())
    assert record["soundness_violations"] == 0
    assert record["estimated"]["num_inputs"] == 4 and record["estimated"]["method"]
    assert (tmp_path / "margins.csv").is_file() and (tmp_path / "certified_margins.csv").is_file()
    # the best epoch's weights, frozen, are what was certified: recomputed here from the checkpoint
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert record["evaluated_epoch"] == best["epoch"] + 1
    again = VAEModule(tiny_vae())
    again.load_state_dict(best["state_dict"])
    vae = again.vae.freeze()
    _, summary = certify_test_split(vae, data.split("test"), None, vae.lipschitz_constants(), [8.0], [0.5],
                                    ["tight", "paper"], 100)
    assert record["certified"]["mean"] == pytest.approx(summary["mean"], rel=1e-6)
    assert record["certified"]["num_inputs"] == len(data.split("test"))
    # a frozen copy was evaluated: the module is as fitting left it (its last epoch's weights)
    assert any(isinstance(m, LipschitzLinear) for m in module.vae.modules())
    assert not getattr(module, "_evaluating_margins", False)


class PlainData(L.LightningDataModule):
    """A datamodule of someone else's: loaders only, no lipvae split."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images[:200]), batch_size=50)

    def test_dataloader(self):
        return DataLoader(TensorDataset(self.images[200:], torch.arange(len(self.images) - 200) % 10), batch_size=40)


class NoValModule(VAEModule):
    val_dataloader = None


@pytest.mark.slow
def test_margins_from_a_datamodule_with_loaders_only(tmp_path, synthetic_root):
    L.seed_everything(0, verbose=False)
    images = ImageDataModule(root=str(synthetic_root / "mnist"), limit=300, resplit=True)
    images.setup()
    x = torch.cat([images.split(s).images for s in ("train", "val", "test")])[:260]
    vae = VAE(kind="lipschitz", input_shape=(1, 28, 28), hidden=(16, 16), latent_dim=4, layer=AOLLinear)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0, callbacks=[EstimatedMargins(attack=ATTACK, dirpath=tmp_path / "m",
                                                                         weights="last"),
                                                        CertifiedMargins(num_inputs=10)])
    trainer.fit(VAEModule(vae, lr=1e-3), datamodule=PlainData(x))
    record = json.loads((tmp_path / "m" / "evaluation.json").read_text())
    assert record["certified"]["num_inputs"] == 10 and record["estimated"]["num_inputs"] == 4
    assert record["soundness_violations"] == 0 and record["weights"] == "last"


def test_too_few_certified_inputs_are_refused_before_training(tmp_path):
    """The settings of both callbacks are checked together when fitting starts (the rule of
    lipvae.config.validate): certifying 2 inputs cannot check the certificates of 4 attacked ones."""
    x = torch.rand(120, 784, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                        callbacks=[CertifiedMargins(num_inputs=2), EstimatedMargins(attack=ATTACK)])
    module = NoValModule(tiny_vae(), lr=1e-3)
    with pytest.raises(UserError, match=r"^margins.certified_inputs: got 2; accepted: null, or at least margins.attacked_inputs=4"):
        trainer.fit(module, datamodule=PlainData(x))
    assert trainer.global_step == 0 and not (tmp_path / "evaluation.json").exists()


def test_a_bad_weights_choice_is_one_line():
    with pytest.raises(UserError, match="^weights: got 'worst'; accepted: best, last$"):
        CertifiedMargins(weights="worst")


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, synthetic_root):
    """README's "Margins in a Lightning loop of your own", executed with its run folder in tmp_path."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    code = re.search(r"<!-- margins-example .*?-->\n```python\n(.*?)```", readme, flags=re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    L.seed_everything(0, verbose=False)
    exec(compile(code.replace('"outputs/mine"', repr(str(tmp_path / "mine"))), "README.md", "exec"), {})
    record = json.loads((tmp_path / "mine" / "evaluation.json").read_text())
    assert record["soundness_violations"] == 0 and record["estimated"]["num_inputs"] == 5
    assert record["certified"]["fraction_certified"] > 0 and record["weights"] == "best"
