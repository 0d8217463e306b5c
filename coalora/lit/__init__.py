"""One LightningModule for every method, plus callbacks."""

from coalora.lit.module import FinetuneModule

__all__ = ["FinetuneModule"]
