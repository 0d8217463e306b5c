"""Tokenized storage, dynamic padding and (length-grouped) seeded sampling for GLUE batches.

Sequences are tokenized once without padding and stored flat (one int32 array plus offsets), so a
split of hundreds of thousands of pairs costs a few MB rather than Python lists of ints. Batches
are padded to the longest member only (short sequences are what make CPU training
affordable); grouping similar lengths into a batch reduces padding further.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Sampler

from coalora.errors import ConfigError

ENCODE_CHUNK = 4096  # rows tokenized per tokenizer call


class EncodedSplit(Dataset):
    """Tokenized rows: ``{"input_ids", ["token_type_ids"], "labels"}`` as numpy arrays per item."""

    def __init__(
        self,
        input_ids: np.ndarray,  # (total_tokens,) int32
        offsets: np.ndarray,  # (n + 1,) int64
        labels: np.ndarray,  # (n,) int64, float32 for regression
        token_type_ids: np.ndarray | None = None,  # (total_tokens,) int8
    ):
        self.input_ids = input_ids
        self.offsets = offsets
        self.labels = labels
        self.token_type_ids = token_type_ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        item = {"input_ids": self.input_ids[start:end], "labels": self.labels[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[start:end]
        return item

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_split(
    texts: Sequence[Sequence[str]],
    labels: Sequence[int | float],
    tokenizer,
    max_length: int,
    regression: bool = False,
) -> EncodedSplit:
    """Tokenize one or two text columns (truncated to ``max_length``, no padding)."""
    if len(texts) not in (1, 2):
        raise ValueError(f"expected 1 or 2 text columns, got {len(texts)}")
    n = len(labels)
    ids_parts: list[np.ndarray] = []
    type_parts: list[np.ndarray] = []
    lengths = np.zeros(n, dtype=np.int64)
    has_types = None
    for start in range(0, n, ENCODE_CHUNK):
        stop = min(start + ENCODE_CHUNK, n)
        args = [list(col[start:stop]) for col in texts]
        enc = tokenizer(
            *args,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
        )
        if has_types is None:
            has_types = "token_type_ids" in enc
        for j, ids in enumerate(enc["input_ids"]):
            lengths[start + j] = len(ids)
        ids_parts.append(np.fromiter((t for seq in enc["input_ids"] for t in seq), dtype=np.int32))
        if has_types:
            type_parts.append(
                np.fromiter((t for seq in enc["token_type_ids"] for t in seq), dtype=np.int8)
            )
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    input_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    token_types = None
    if has_types:
        token_types = np.concatenate(type_parts) if type_parts else np.zeros(0, dtype=np.int8)
    label_arr = np.asarray(labels, dtype=np.float32 if regression else np.int64)
    return EncodedSplit(input_ids, offsets, label_arr, token_types)


class GlueCollator:
    """Pads a list of :class:`EncodedSplit` items to the longest one; returns torch tensors.

    Output: ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``token_type_ids`` (B, T)
    when the tokenizer produces them, ``labels`` (B,) long or float (regression).
    Hand-written rather than ``DataCollatorWithPadding``: items are int32 numpy slices of one flat
    array, which that collator would first round-trip through the tokenizer's ``pad`` per batch.
    """

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}; allowed: [right, left]")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None) -> GlueCollator:
        """Pad with the tokenizer's pad id (else its EOS id, as for LLaMA, else 0), on its side."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        side = getattr(tokenizer, "padding_side", "right") or "right"
        return cls(0 if pad is None else pad, side, pad_to_multiple_of)

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = len(items)
        ids = np.full((batch, longest), self.pad_token_id, dtype=np.int64)  # (B, T)
        mask = np.zeros((batch, longest), dtype=np.int64)  # (B, T)
        with_types = "token_type_ids" in items[0]
        types = np.zeros((batch, longest), dtype=np.int64) if with_types else None
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            ids[b, cols] = it["input_ids"]
            mask[b, cols] = 1
            if types is not None:
                types[b, cols] = it["token_type_ids"]
        labels = np.asarray([it["labels"] for it in items])
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            out["token_type_ids"] = torch.from_numpy(types)
        if labels.dtype.kind == "f":
            out["labels"] = torch.from_numpy(labels.astype(np.float32))
        else:
            out["labels"] = torch.from_numpy(labels.astype(np.int64))
        return out


class SeededShuffleSampler(Sampler[int]):
    """A permutation per epoch drawn from ``seed + epoch``: reproducible, and the same after a
    resume or a re-created dataloader (Lightning calls :meth:`set_epoch`).

    Resumable mid-epoch: :meth:`state_dict` / :meth:`load_state_dict` carry the epoch and
    ``skip``, the number of this epoch's indices already trained on; the next iteration yields
    the rest of the epoch's order, so a resumed run sees exactly the batches the uninterrupted
    run would have (docs/reliability.md). ``__len__`` stays the full epoch (Lightning counts the
    epoch's batches from its own restored progress).
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.skip = 0  # a restored position belongs to its own epoch only
        self.epoch = int(epoch)

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def order(self) -> list[int]:
        """The full index order of the current epoch."""
        return self._permutation()

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        skip, self.skip = self.skip, 0  # the next epoch starts from its beginning
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int | str]:
        return {
            "kind": type(self).__name__,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "skip": self.skip,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch and position; a state of another sampler, seed or data size is an error
        (the resumed batches would not be the uninterrupted run's)."""
        for key in ("kind", "seed", "num_samples"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"sampler state has {key}={state[key]!r}, this run has "
                    f"{self.state_dict()[key]!r}: resume with the same data, seed and "
                    f"data.group_by_length"
                )
        skip = int(state.get("skip", 0))
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"sampler state skip={skip} is outside [0, {self.num_samples}]")
        self.epoch = int(state.get("epoch", 0))
        self.skip = skip


class LengthGroupedSampler(SeededShuffleSampler):
    """Shuffle, then sort by length (longest first) inside mega-batches of
    ``batch_size * mega_batch_mult`` indices, so each batch holds similar lengths while the batch
    order stays random at the mega-batch level (the HF Trainer's ``group_by_length`` scheme)."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50
    ):
        super().__init__(len(lengths), seed)
        self.lengths = np.asarray(lengths)
        self.mega = max(1, int(batch_size) * int(mega_batch_mult))

    def order(self) -> list[int]:
        perm = self._permutation()
        out: list[int] = []
        for start in range(0, len(perm), self.mega):
            chunk = perm[start : start + self.mega]
            out.extend(sorted(chunk, key=lambda i: -int(self.lengths[i])))
        return out


class LengthSortedSampler(Sampler[int]):
    """Indices longest first (stable, no randomness): evaluation batches then pad to similar
    lengths. Accuracy, F1, MCC and correlations do not depend on the order of the examples."""

    def __init__(self, lengths: Sequence[int]):
        lengths = np.asarray(lengths)
        self.order = np.argsort(-lengths, kind="stable").tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class TaskDataModule(L.LightningDataModule):
    """What every task's data module shares: the validated task config, tokenizer, data folder,
    batch sizes, seed and whether the hub may be used."""

    def __init__(
        self,
        task: DictConfig,
        tokenizer,
        data_dir: str | None,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        seed: int,
        allow_hub: bool,
        validate: Callable[[DictConfig], object],
    ) -> None:
        super().__init__()
        task = task if isinstance(task, DictConfig) else OmegaConf.create(task)
        validate(task)
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if int(value) < 1:
                raise ConfigError(f"data.{key}={value} must be >= 1")
        self.task = task
        self.tokenizer = tokenizer
        self.data_dir = None if data_dir in (None, "") else str(data_dir)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.allow_hub = bool(allow_hub)
        # (epoch, batches already trained in it): set by coalora.lit.resume.DeterministicResume
        # when a checkpoint is loaded; the next train_dataloader() starts there
        self.resume_position: tuple[int, int] | None = None

    def resumed(self, sampler: SeededShuffleSampler, num_samples: int) -> SeededShuffleSampler:
        """``sampler`` moved to the pending resume position (once), so a resumed run sees the
        batches the uninterrupted one would have (docs/reliability.md, "Resume")."""
        if self.resume_position is not None:
            epoch, batches = self.resume_position
            per_epoch = -(-num_samples // self.batch_size)
            if batches >= per_epoch:  # the checkpoint closed its epoch: start the next one
                epoch, batches = epoch + 1, 0
            sampler.load_state_dict(
                {**sampler.state_dict(), "epoch": epoch, "skip": batches * self.batch_size}
            )
            self.resume_position = None
        return sampler
