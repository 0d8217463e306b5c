import io
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from coalora.errors import ConfigError
from coalora.lit.progress import (
    LineProgressBar,
    StepAwareRichProgressBar,
    is_terminal,
    progress_bar,
)


def description(max_epochs):
    bar = StepAwareRichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    return bar._get_train_description(0).strip()


def test_step_limited_runs_show_no_negative_epoch_total():
    assert description(-1) == "Epoch 0"
    assert description(None) == "Epoch 0"
    assert description(3) == "Epoch 0/2"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_picks_lines_off_a_terminal():
    assert not is_terminal(io.StringIO())
    assert is_terminal(FakeTTY())
    assert isinstance(progress_bar(stream=io.StringIO()), LineProgressBar)
    assert isinstance(progress_bar(stream=FakeTTY()), StepAwareRichProgressBar)
    assert isinstance(progress_bar(line_mode="always", stream=FakeTTY()), LineProgressBar)
    assert isinstance(
        progress_bar(line_mode="never", stream=io.StringIO()), StepAwareRichProgressBar
    )
    with pytest.raises(ConfigError, match="line_mode"):
        progress_bar(line_mode="sometimes")


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", nn.functional.mse_loss(self.net(x).squeeze(-1), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_line_progress_writes_steps_eta_and_validation_to_a_plain_stream(tmp_path):
    stream = io.StringIO()  # not a TTY, like `tee` or a SLURM log
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("coalora.progress.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = TensorDataset(x, x.sum(-1))
    trainer = L.Trainer(
        max_steps=20,
        max_epochs=-1,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[LineProgressBar(every_n_steps=5, logger=logger)],
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    try:
        trainer.fit(Tiny(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=32))
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("train step")]
    assert [line.split()[2] for line in steps] == ["5/20", "10/20", "15/20", "20/20"]
    assert all("train/loss" in line and "s/step" in line and "ETA" in line for line in steps)
    assert "ETA 0s" in steps[-1]
    vals = [line for line in lines if line.startswith("validation at step") and "val/mse" in line]
    assert len(vals) == 2  # after steps 10 and 20
    assert lines[0] == "training: 20 steps" and lines[-1].startswith("training done: 20 steps")
    assert not any("\r" in line or "\x1b[" in line for line in lines)  # no bar redraws


def test_line_progress_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="every_n_steps"):
        LineProgressBar(every_n_steps=0)
