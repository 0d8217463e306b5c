"""One LightningModule for every method, plus callbacks."""

from coalora.lit.module import CoaloraModule

__all__ = ["CoaloraModule"]
