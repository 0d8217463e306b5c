"""Lightning's ``WandbLogger`` without the deprecated ``anonymous`` setting.

Lightning always passes ``anonymous=None`` to ``wandb.init``; wandb >= 0.19 warns that the setting
has no effect on every run ("The anonymous setting has no effect ..."). This subclass drops the
key when it is unset, so a W&B run starts without that warning. Everything else is Lightning's.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
