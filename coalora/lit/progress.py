"""Rich progress bar whose description reads well for step-limited runs.

Lightning's bar prints ``Epoch 0/-2`` when ``max_epochs=-1`` (our default: training is bounded by
``trainer.max_steps``); this one prints ``Epoch 0`` then, and ``Epoch 0/2`` when epochs bound it.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepAwareRichProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        width = len(self.validation_description)
        return f"{description:{width}}" if width > len(description) else description
