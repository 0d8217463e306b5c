"""Causal-LM data (``task.kind: causal_lm``): WikiText-2 raw and C4, packed into token blocks.

Protocol (docs/decoder_lms.md):

* **Text.** WikiText-2 raw: the file ``<paths.data_dir>/<task.local_dir>/<task.local_files[split]>``
  read as one string, else the hub dataset (``Salesforce/wikitext``, ``wikitext-2-raw-v1``)
  whose lines joined with ``""`` give the same text. This repository's copy has only the
  ``valid`` and ``test`` splits, so the default trains on ``valid`` and reports on ``test``
  (``task.train_split`` / ``task.eval_split``). C4: the hub dataset ``allenai/c4`` (``en``),
  streamed; documents are joined with the tokenizer's EOS token. Offline, C4 is one clear error.
* **Packing.** The split is tokenized once without special tokens and cut into non-overlapping
  blocks of ``task.block_length`` tokens (the last partial block is dropped): no padding, every
  position is a real token, ``attention_mask`` is all ones and ``labels == input_ids`` (the
  model shifts them).
* **Token budgets.** Training uses ``task.max_train_blocks`` blocks (a subset drawn with the seed;
  ``null`` = every block), i.e. ``max_train_blocks * block_length`` tokens, visited in a seeded
  order per epoch. Evaluation uses ``task.eval_blocks`` blocks spread evenly over the evaluation
  split (the same blocks for every method and seed), scoring ``block_length - 1`` predicted
  tokens per block; ``null`` = every block.

Batches: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, block_length)`` long.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from coalora.data.batching import SeededShuffleSampler, TaskDataModule
from coalora.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCES = ("wikitext", "c4")
REQUIRED_KEYS = (
    "name",
    "kind",
    "source",
    "hub_name",
    "hub_config",
    "train_split",
    "eval_split",
    "block_length",
    "max_train_blocks",
    "eval_blocks",
    "metric",
    "monitor",
    "mode",
    "higher_is_better",
)
EVAL_STAGES = ("validate", "test", "predict")


def _is_integer(value: Any) -> bool:
    """An int, or text spelling one ("16" from an environment variable); not a bool, 1.5 or "abc"."""
    if isinstance(value, bool):
        return False
    try:
        int(str(value))
    except ValueError:
        return False
    return True


def validate_lm_task(task: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key of a causal-LM task config."""
    name = task.get("name", "?")
    missing = [k for k in REQUIRED_KEYS if k not in task]
    if missing:
        raise ConfigError(
            f"task '{name}': missing config keys {missing} (see conf/task/wikitext2.yaml)"
        )
    if task.kind != "causal_lm":
        raise ConfigError(
            f"task '{name}': task.kind={task.kind!r}; a causal-LM task needs causal_lm"
        )
    if task.source not in SOURCES:
        raise ConfigError(
            f"task '{name}': task.source={task.source!r} is not allowed; allowed: {list(SOURCES)}"
        )
    if task.metric != "perplexity":
        raise ConfigError(f"task '{name}': task.metric={task.metric!r}; allowed: [perplexity]")
    if task.mode != "min" or bool(task.higher_is_better):
        raise ConfigError(
            f"task '{name}': perplexity is lower-is-better: task.mode must be min and "
            f"task.higher_is_better false (got {task.mode!r}, {task.higher_is_better!r})"
        )
    if str(task.train_split) == str(task.eval_split):
        raise ConfigError(
            f"task '{name}': task.train_split and task.eval_split are both {task.eval_split!r}; "
            "training on the evaluation text makes its perplexity meaningless"
        )
    for key in ("block_length", "max_train_blocks", "eval_blocks"):
        value = task[key]
        if value is None and key != "block_length":
            continue
        if not _is_integer(value):
            allowed = "an integer >= 8" if key == "block_length" else "null or an integer >= 1"
            raise ConfigError(f"task '{name}': task.{key}={value!r} must be an integer ({allowed})")
    if int(task.block_length) < 8:
        raise ConfigError(f"task '{name}': task.block_length={task.block_length} must be >= 8")
    for key in ("max_train_blocks", "eval_blocks"):
        value = task[key]
        if value is not None and int(value) < 1:
            raise ConfigError(f"task '{name}': task.{key}={value} must be null or >= 1")
    if bool(task.get("streaming", False)) and (
        task.max_train_blocks is None or task.eval_blocks is None
    ):
        raise ConfigError(
            f"task '{name}': a streamed dataset needs task.max_train_blocks and task.eval_blocks "
            "(the token budget decides how much of the stream is read)"
        )


def check_context_length(task: DictConfig, max_positions: int | None) -> None:
    """Warn (naming both numbers) when a block is longer than the model's context window: the
    positions past it are out of the model's range, so its perplexity means little."""
    if max_positions is not None and int(task.block_length) > int(max_positions):
        log.warning(
            "task.block_length=%s is above the model's max_position_embeddings=%s: positions past "
            "%s are outside what the model was trained on",
            task.block_length,
            max_positions,
            max_positions,
        )


# --------------------------------------------------------------------------- packing
def tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of a whole split, no special tokens (one call: boundaries match the text)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def pack_ids(ids: list[int] | torch.Tensor, block_length: int) -> torch.Tensor:
    """(N, block_length) non-overlapping blocks; the trailing partial block is dropped."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // block_length
    return ids[: n * block_length].view(n, block_length)


def pack_documents(
    texts: Iterable[str], tokenizer, block_length: int, max_blocks: int | None
) -> torch.Tensor:
    """Pack documents separated by EOS into blocks, reading only as many as ``max_blocks``
    needs (what a streamed corpus such as C4 requires)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("packing documents needs a tokenizer with an EOS token")
    need = None if max_blocks is None else int(max_blocks) * block_length
    ids: list[int] = []
    for text in texts:
        if not text:
            continue
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    return pack_ids(ids if need is None else ids[:need], block_length)


def evenly_spaced(n: int, k: int | None) -> torch.Tensor:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k`` is None or >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, int(k)).round().long()


class TokenBlocks(Dataset):
    """Rows of a ``(N, T)`` token tensor."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]

    @property
    def num_tokens(self) -> int:
        return int(self.blocks.numel())


def collate_blocks(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# --------------------------------------------------------------------------- data module
class LMDataModule(TaskDataModule):
    """A causal-LM corpus as packed token blocks: seeded training order, fixed evaluation blocks,
    and calibration batches with the same contract as ``GlueDataModule``."""

    def __init__(
        self,
        task: DictConfig,
        tokenizer,
        data_dir: str | None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        allow_hub: bool = True,
    ):
        super().__init__(
            task, tokenizer, data_dir, batch_size, eval_batch_size, num_workers, seed, allow_hub,
            validate_lm_task,
        )  # fmt: skip
        self.block_length = int(self.task.block_length)
        self.blocks: dict[str, TokenBlocks] = {}
        self._train_pool: tuple[torch.Tensor, int | None] = (torch.empty(0, 0), None)
        self.sources: dict[str, str] = {}  # split -> "local:<file>" | "hub:<id>/<config>/<split>"

    # ----------------------------------------------------------------- properties
    @property
    def train_set(self) -> TokenBlocks:
        return self._get("train")

    @property
    def val_set(self) -> TokenBlocks:
        return self._get("eval")

    def budget(self) -> dict[str, int | str]:
        """The token budgets actually used (for result tables); needs :meth:`setup`."""
        out: dict[str, int | str] = {
            "block_length": self.block_length,
            "train_split": str(self.task.train_split),
            "eval_split": str(self.task.eval_split),
        }
        if "train" in self.blocks:
            out |= {"train_blocks": len(self.train_set), "train_tokens": self.train_set.num_tokens}
        if "eval" in self.blocks:
            n = len(self.val_set)
            out |= {"eval_blocks": n, "eval_predicted_tokens": n * (self.block_length - 1)}
        return out

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        roles = ("eval",) if stage in EVAL_STAGES else ("train", "eval")
        if all(role in self.blocks for role in roles):
            return  # set up already (Lightning calls setup once per stage)
        for role in roles:
            if role in self.blocks:
                continue
            split = str(self.task.train_split if role == "train" else self.task.eval_split)
            limit = self.task.max_train_blocks if role == "train" else self.task.eval_blocks
            blocks = self._split_blocks(split, limit)
            if blocks.shape[0] == 0:
                raise DataError(
                    f"task '{self.task.name}': split {split!r} has fewer than "
                    f"task.block_length={self.block_length} tokens"
                )
            if limit is not None and blocks.shape[0] < int(limit):
                key = "max_train_blocks" if role == "train" else "eval_blocks"
                log.warning(
                    "task.%s=%s but split %r has only %d blocks of task.block_length=%d tokens; "
                    "using %d",
                    key, limit, split, blocks.shape[0], self.block_length, blocks.shape[0],
                )  # fmt: skip
            if role == "train":  # a seeded subset, kept in corpus order
                self._train_pool = (blocks, limit)
                blocks = self._train_subset(self.seed)
            elif limit is not None and blocks.shape[0] > int(limit):
                # the same evenly spread blocks for every method and seed
                blocks = blocks[evenly_spaced(blocks.shape[0], int(limit))]
            self.blocks[role] = TokenBlocks(blocks)
        log.info("LM task %s: %s (%s)", self.task.name, self.budget(), self.sources)

    def _train_subset(self, seed: int) -> torch.Tensor:
        """The ``task.max_train_blocks`` training blocks drawn with ``seed`` (all when unset)."""
        blocks, limit = self._train_pool
        if limit is None or blocks.shape[0] <= int(limit):
            return blocks
        g = torch.Generator().manual_seed(int(seed))
        return blocks[torch.randperm(blocks.shape[0], generator=g)[: int(limit)].sort().values]

    def train_dataloader(self) -> DataLoader:
        data = self.train_set
        sampler = self.resumed(SeededShuffleSampler(len(data), self.seed), len(data))
        return self._loader(data, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def calibration_batches(
        self, n: int, seed: int = 0, batch_size: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """``n`` fixed training batches drawn with ``seed`` (independent of the training order)
        from the training subset drawn with the same ``seed`` (the run's own subset when ``seed``
        is the run's); the same ``(n, seed, batch_size)`` gives the same batches whatever the
        run's seed; cycles when data runs out."""
        if n < 1:
            raise ValueError(f"calibration_batches: n={n} must be >= 1")
        if "train" not in self.blocks:
            self.setup("fit")
        data = self.train_set if int(seed) == self.seed else TokenBlocks(self._train_subset(seed))
        if len(data) == 0:  # cycling through nothing would never end
            raise ValueError("calibration_batches: the training split has no examples")
        size = int(batch_size or self.batch_size)
        g = torch.Generator().manual_seed(int(seed))
        order: list[int] = []
        while len(order) < n * size:
            order.extend(torch.randperm(len(data), generator=g).tolist())
        return [
            collate_blocks([data[i] for i in order[b * size : (b + 1) * size]]) for b in range(n)
        ]

    # ----------------------------------------------------------------- loading
    def _split_blocks(self, split: str, limit: int | None) -> torch.Tensor:
        task = self.task
        if task.source == "wikitext":
            return pack_ids(tokenize_text(self.tokenizer, self.read_text(split)), self.block_length)
        # c4: stream documents until the budget is filled
        return pack_documents(self._hub_texts(split), self.tokenizer, self.block_length, limit)

    def local_file(self, split: str) -> Path | None:
        files = self.task.get("local_files") or {}
        if self.data_dir is None or split not in files or not self.task.get("local_dir"):
            return None
        return Path(self.data_dir) / str(self.task.local_dir) / str(files[split])

    def read_text(self, split: str) -> str:
        """The raw text of a split: the local file, else the hub lines joined with ``""``."""
        path = self.local_file(split)
        if path is not None and path.is_file():
            self.sources[split] = f"local:{path}"
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"task '{self.task.name}': {path} is not UTF-8 text (byte {exc.start}: "
                    f"{exc.reason}); WikiText-2 raw files are UTF-8"
                ) from None
        return "".join(self._hub_texts(split))

    def _hub_split(self, split: str) -> str:
        names = self.task.get("hub_splits") or {}
        if split not in names:
            raise ConfigError(
                f"task '{self.task.name}': split {split!r} is not in task.hub_splits "
                f"(allowed: {sorted(names)})"
            )
        return str(names[split])

    def _hub_texts(self, split: str) -> Iterable[str]:
        task = self.task
        hub_split = self._hub_split(split)
        hub = f"'{task.hub_name}' (config '{task.hub_config}', split '{hub_split}')"
        if not self.allow_hub:
            raise self._missing(split, "the hub fallback is disabled (data.allow_hub=false)")
        streaming = bool(task.get("streaming", False))
        try:
            import datasets

            ds = datasets.load_dataset(
                str(task.hub_name), str(task.hub_config), split=hub_split, streaming=streaming
            )
            field = str(task.get("hub_text_field", "text"))
            texts = (row[field] for row in ds) if streaming else ds[field]
            if streaming:  # fail here, not later inside packing, when the stream cannot open
                first = next(iter(texts))
                texts = _chain_first(first, texts)
        except Exception as exc:  # network, auth, missing cache: all end in the same message
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            raise self._missing(
                split, f"the hub dataset {hub} failed ({type(exc).__name__}: {first_line})"
            ) from None
        self.sources[split] = f"hub:{task.hub_name}/{task.hub_config}/{hub_split}"
        return texts

    def _missing(self, split: str, reason: str) -> DataError:
        path = self.local_file(split)
        where = (
            f"no local file {path} (paths.data_dir={self.data_dir!r}; set it or env "
            "COALORA_DATA_DIR)"
            if path is not None or self.task.get("local_files")
            else "no local copy (hub only)"
        )
        if path is None and self.task.get("local_files") and self.data_dir is None:
            where = "paths.data_dir is unset (set it or env COALORA_DATA_DIR)"
        return DataError(f"task '{self.task.name}' split '{split}': {where} and {reason}")

    def _get(self, role: str) -> TokenBlocks:
        if role not in self.blocks:
            raise RuntimeError(f"LMDataModule: the {role} blocks are not set up; call setup()")
        return self.blocks[role]

    def _loader(self, data: TokenBlocks, batch_size: int, sampler) -> DataLoader:
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=collate_blocks,
            num_workers=self.num_workers,
        )


def _chain_first(first: str, rest: Iterable[str]) -> Iterable[str]:
    yield first
    yield from rest
