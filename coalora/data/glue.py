"""GLUE as a LightningDataModule: local TSV first, the hub as fallback (docs/architecture.md,
"coalora.data").

Data is looked up under ``<data_dir>/glue/<task.glue_dir>/`` (``data_dir`` is
``paths.data_dir``, which the config fills from env ``COALORA_DATA_DIR``). When the files are not
there, ``datasets.load_dataset(task.hub_name, task.hub_config)`` is tried; when that fails too a
:class:`coalora.errors.DataError` with one line naming ``paths.data_dir``, the expected file and
the hub id is raised. Sequences are tokenized once (truncated to ``task.max_length``, unpadded)
and padded per batch. Batches are dicts that ``hf_model(**batch)`` accepts.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from coalora.data.batching import (
    EncodedSplit,
    GlueCollator,
    LengthGroupedSampler,
    LengthSortedSampler,
    SeededShuffleSampler,
    TaskDataModule,
    encode_split,
)
from coalora.data.glue_tsv import (
    LABEL,
    TRAIN,
    VALIDATION,
    convert_label,
    expected_task_file,
    find_task_files,
    read_glue_columns,
)
from coalora.data.task import hub_text_fields, task_get, text_fields, validate_task
from coalora.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EVAL_STAGES = ("validate", "test", "predict")


def _label_affine(task: DictConfig) -> tuple[float, float]:
    shift = float(task_get(task, "label_shift", 0.0))
    scale = float(task_get(task, "label_scale", 1.0))
    if not scale > 0:
        raise ConfigError(f"task.label_scale={scale} must be > 0 (the targets' standard deviation)")
    return shift, scale


def regression_targets(values, task: DictConfig) -> list[float]:
    """Training targets of a regression task: ``(y - task.label_shift) / task.label_scale``.

    With the train split's mean and standard deviation the head starts at the right scale: a
    zero-initialised bias under Adam moves about ``lr`` per step, so raw STS-B scores (mean 2.7,
    std 1.46) leave a 300-step LoRA run fitting the mean only (dev Pearson 0.08, docs/results/
    stsb_regression.md). Pearson and Spearman do not change under this affine map; predictions
    in task units are ``to_task_units(pred, task)``.
    """
    shift, scale = _label_affine(task)
    return [(float(v) - shift) / scale for v in values]


def to_task_units(pred, task: DictConfig):
    """Inverse of :func:`regression_targets` (a model output back to the task's score scale)."""
    shift, scale = _label_affine(task)
    return pred * scale + shift


class GlueDataModule(TaskDataModule):
    """One GLUE task: tokenized train/validation splits, seeded loaders, calibration batches.

    Batches: ``input_ids`` and ``attention_mask`` (B, T) long, ``token_type_ids`` (B, T) when the
    tokenizer makes them, ``labels`` (B,) long (float for regression, standardised by
    :func:`regression_targets`).
    """

    def __init__(
        self,
        task: DictConfig,
        tokenizer,
        data_dir: str | None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        group_by_length: bool = False,
        allow_hub: bool = True,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
    ):
        super().__init__(
            task, tokenizer, data_dir, batch_size, eval_batch_size, num_workers, seed, allow_hub,
            validate_task,
        )  # fmt: skip
        self.group_by_length = bool(group_by_length)
        # the constructor's limits win over task.max_*_samples (evaluate.py's eval.max_eval_samples)
        self.limits = {
            TRAIN: task_get(self.task, "max_train_samples"),
            VALIDATION: task_get(self.task, "max_eval_samples"),
        }
        for split, key, value in (
            (TRAIN, "max_train_samples", max_train_samples),
            (VALIDATION, "max_eval_samples", max_eval_samples),
        ):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{key}={value!r} must be an integer >= 1 (or null)")
                self.limits[split] = int(value)
        self.collator = GlueCollator.for_tokenizer(tokenizer)
        self.encoded: dict[str, EncodedSplit] = {}
        self.source: str | None = None  # "local:<folder>" or "hub:<id>/<config>", after setup

    # ----------------------------------------------------------------- properties
    @property
    def num_labels(self) -> int:
        return int(self.task.num_labels)

    @property
    def is_regression(self) -> bool:
        return bool(self.task.is_regression)

    @property
    def train_set(self) -> EncodedSplit:
        return self._split(TRAIN)

    @property
    def val_set(self) -> EncodedSplit:
        return self._split(VALIDATION)

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        # Local TSVs need nothing; the hub path downloads into the HF cache here (rank 0 only).
        if find_task_files(self.data_dir, self.task, (VALIDATION,)) is None:
            self._hub_dataset((TRAIN, VALIDATION))

    def setup(self, stage: str | None = None) -> None:
        needed = (VALIDATION,) if stage in EVAL_STAGES else (TRAIN, VALIDATION)
        todo = tuple(s for s in needed if s not in self.encoded)
        if not todo:
            return
        raw = self.load_raw(todo)
        for split in todo:
            columns = self._subsample(split, raw[split])
            if not columns[LABEL]:
                raise DataError(
                    f"GLUE task '{self.task.name}': the {split} split from {self.source} has no "
                    f"examples; it needs at least one"
                )
            labels = columns[LABEL]
            if self.is_regression:
                labels = regression_targets(labels, self.task)
            self.encoded[split] = encode_split(
                [columns[f] for f in text_fields(self.task)],
                labels,
                self.tokenizer,
                int(self.task.max_length),
                regression=self.is_regression,
            )
        sizes = ", ".join(f"{s}={len(self.encoded[s])}" for s in todo)
        log.info("GLUE %s from %s: %s", self.task.name, self.source, sizes)

    def train_dataloader(self) -> DataLoader:
        data = self.train_set
        if self.group_by_length:
            sampler = LengthGroupedSampler(data.lengths, self.batch_size, seed=self.seed)
        else:
            sampler = SeededShuffleSampler(len(data), seed=self.seed)
        return self._loader(data, self.batch_size, self.resumed(sampler, len(data)))

    def val_dataloader(self) -> DataLoader:
        data = self.val_set
        return self._loader(data, self.eval_batch_size, LengthSortedSampler(data.lengths))

    def test_dataloader(self) -> DataLoader:
        """GLUE hides test labels; the test loop scores the dev split (the usual GLUE-dev protocol)."""
        return self.val_dataloader()

    # ----------------------------------------------------------------- calibration
    def calibration_batches(
        self, n: int, seed: int = 0, batch_size: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """``n`` fixed training batches drawn with ``seed`` (independent of the training shuffle).

        Used for Fisher-weighted allocation and as the search stage's loss batches; the same
        ``(n, seed, batch_size)`` gives the same batches. Cycles through the data when
        ``n * batch_size`` exceeds the training set.
        """
        if n < 1:
            raise ValueError(f"calibration_batches: n={n} must be >= 1")
        if TRAIN not in self.encoded:
            self.setup("fit")
        data = self.train_set
        if len(data) == 0:  # cycling through nothing would never end
            raise ValueError("calibration_batches: the training split has no examples")
        size = int(batch_size or self.batch_size)
        g = torch.Generator().manual_seed(int(seed))
        order: list[int] = []
        while len(order) < n * size:
            order.extend(torch.randperm(len(data), generator=g).tolist())
        return [
            self.collator([data[i] for i in order[b * size : (b + 1) * size]]) for b in range(n)
        ]

    # ----------------------------------------------------------------- loading
    def load_raw(self, splits: tuple[str, ...] = (TRAIN, VALIDATION)) -> dict[str, dict[str, list]]:
        """Untokenized ``{split: {text field: [...], "label": [...]}}``, local TSV else hub."""
        files = find_task_files(self.data_dir, self.task, splits)
        if files is not None:
            self.source = f"local:{next(iter(files.values())).parent}"
            return {split: read_glue_columns(path, self.task) for split, path in files.items()}
        return self._load_hub(splits)

    def _hub_dataset(self, splits: tuple[str, ...]):
        """``datasets.load_dataset(hub_name, hub_config)``, or the one-line :class:`DataError`."""
        task = self.task
        hub = f"'{task.hub_name}' (config '{task.hub_config}')"
        if not self.allow_hub:
            raise self._missing(splits, "the hub fallback is disabled (allow_hub=false)")
        try:
            import datasets

            return datasets.load_dataset(str(task.hub_name), str(task.hub_config))
        except Exception as exc:  # network, auth, missing cache: all end in the same message
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise self._missing(
                splits, f"the hub fallback {hub} failed ({type(exc).__name__}: {first})"
            ) from None

    def _load_hub(self, splits: tuple[str, ...]) -> dict[str, dict[str, list]]:
        task = self.task
        hub = f"{task.hub_name}/{task.hub_config}"
        dsd = self._hub_dataset(splits)
        names = {
            TRAIN: str(task_get(task, "hub_train_split", "train")),
            VALIDATION: str(task_get(task, "hub_eval_split", "validation")),
        }
        label_col = str(task_get(task, "hub_label_field", "label"))
        out: dict[str, dict[str, list]] = {}
        for split in splits:
            if names[split] not in dsd:
                raise DataError(
                    f"GLUE task '{task.name}': hub dataset '{hub}' has no split '{names[split]}' "
                    f"(has {list(dsd)}; set task.hub_train_split / task.hub_eval_split)"
                )
            ds = dsd[names[split]]
            columns = {
                local: list(ds[remote])
                for local, remote in zip(text_fields(task), hub_text_fields(task))
            }
            columns[LABEL] = [
                convert_label(v, task, f"{hub}[{names[split]}] row {i}")
                for i, v in enumerate(ds[label_col])
            ]
            out[split] = columns
        self.source = f"hub:{hub}"
        return out

    def _missing(self, splits: tuple[str, ...], reason: str) -> DataError:
        expected = [expected_task_file(self.data_dir, self.task, s) for s in splits]
        missing = [str(p) for p in expected if not p.is_file()] or [str(p) for p in expected]
        return DataError(
            f"GLUE task '{self.task.name}': no local data at {', '.join(missing)} "
            f"(paths.data_dir={self.data_dir!r}; set it or env COALORA_DATA_DIR) and {reason}"
        )

    def limit_eval_samples(self, n: int | None) -> None:
        """Keep the first ``n`` validation rows (the subset ``max_eval_samples=n`` builds); works
        before and after :meth:`setup`."""
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_eval_samples={n!r} must be an integer >= 1 (or null)")
        self.limits[VALIDATION] = n
        split = self.encoded.get(VALIDATION)
        if split is not None and len(split) > n:
            end = int(split.offsets[n])
            types = None if split.token_type_ids is None else split.token_type_ids[:end]
            self.encoded[VALIDATION] = EncodedSplit(
                split.input_ids[:end], split.offsets[: n + 1], split.labels[:n], types
            )

    def _subsample(self, split: str, columns: dict[str, list]) -> dict[str, list]:
        """Train: first N after a seeded shuffle; eval: the first N rows (a fixed, ordered subset)."""
        limit = self.limits[split]
        n = len(columns[LABEL])
        if limit is None or int(limit) >= n:
            return columns
        if split == TRAIN:
            keep = np.random.default_rng(self.seed).permutation(n)[: int(limit)]
        else:
            keep = np.arange(int(limit))
        return {name: [values[i] for i in keep] for name, values in columns.items()}

    def _split(self, split: str) -> EncodedSplit:
        if split not in self.encoded:
            raise RuntimeError(
                f"GlueDataModule: the {split} split is not set up; call setup() first"
            )
        return self.encoded[split]

    def _loader(self, data: EncodedSplit, batch_size: int, sampler) -> DataLoader:
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
