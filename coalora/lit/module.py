"""One LightningModule drives every method through small hooks (docs/architecture.md).

Metrics are named ``split/name``: ``train/loss``, ``val/acc`` for the configuration trained on,
``val/acc@3.0`` for the evaluation configuration at 3.0 average bits, ``val/acc@mean`` their mean.
Checkpoints hold the trainable parameters only (adapters, mapper, head).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from coalora.data.metrics import build_metrics, update_metrics

SCHEDULES = ("linear", "cosine", "constant")


class FinetuneModule(L.LightningModule):
    """The quantized model + its method's adapters, trained and validated per configuration."""

    def __init__(self, model: nn.Module, method, task: DictConfig, optim: DictConfig, ctx) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.task = task
        self.optim = optim
        self.ctx = ctx
        self.strict_loading = False  # checkpoints carry trainable parameters only
        self.eval_configs: dict[str, Any] = method.eval_configs()
        self.val_metrics = nn.ModuleDict(
            {self._key(lbl): build_metrics(task, prefix="val/") for lbl in self.eval_configs}
        )
        self.last_val: dict[str, float] = {}
        self.last_val_step = -1
        # Extra trainable modules owned by the method (e.g. the CoA-LoRA mapper) live under
        # ``self.method_modules`` so Lightning sees, moves and checkpoints them.
        self.method_modules = nn.ModuleDict(method.modules())

    @staticmethod
    def _key(label: str) -> str:
        return "current" if label == "" else "at_" + label.replace(".", "_")

    # ------------------------------------------------------------------ train
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.method.training_loss(self.model, batch, self.global_step)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    # ------------------------------------------------------------------ eval
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        for label, config in self.eval_configs.items():
            with self.method.configured(self.model, config):
                logits = self.model(**batch).logits
            update_metrics(self.val_metrics[self._key(label)], self.task, logits, batch)

    def on_validation_epoch_end(self) -> None:
        out: dict[str, float] = {}
        by_metric: dict[str, list[float]] = {}
        for label in self.eval_configs:
            values = self.val_metrics[self._key(label)].compute()
            self.val_metrics[self._key(label)].reset()
            for name, v in values.items():  # name like "val/acc"
                key = name if label == "" else f"{name}@{label}"
                out[key] = float(v)
                if label:
                    by_metric.setdefault(name, []).append(float(v))
        for name, vals in by_metric.items():
            out[f"{name}@mean"] = sum(vals) / len(vals)
        self.last_val = out
        self.last_val_step = self.global_step
        self.log_dict(out, prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ optim
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        o = self.optim
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        # a LambdaLR rather than transformers.get_scheduler: its warmup starts at lr/warm on step 0
        # (get_scheduler's at 0), which every published number here was trained with
        total = self.trainer.estimated_stepping_batches
        warm = int(o.warmup_ratio * total) if o.warmup_steps is None else int(o.warmup_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / max(1, warm)
            if o.schedule == "constant":
                return 1.0
            frac = (step - warm) / max(1, total - warm)
            if o.schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
            return max(0.0, 1.0 - frac)  # linear

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["coalora"] = self.method.extra_state()
        checkpoint["coalora_method"] = self.method.name

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.method.load_extra_state(checkpoint.get("coalora", {}))
