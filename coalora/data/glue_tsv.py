"""Read GLUE's TSV files exactly as distributed (README "Data locations").

GLUE TSVs are *not* CSV: fields contain bare ``"`` characters and are never quoted, so a line is
split on tabs and nothing else (a CSV reader with default quoting merges rows). Further quirks
handled here: MRPC starts with a UTF-8 BOM (read with ``utf-8-sig``), CoLA train/dev have no
header (``task.header: false`` + ``task.columns``), QNLI/RTE/MNLI labels are strings mapped
through ``task.label_names``, STS-B targets are floats. Rows are split on ``\\n`` only, so a stray
``\\r`` or Unicode line separator inside a sentence cannot break a row.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from coalora.data.task import label_names, task_get, text_fields
from coalora.errors import CoaloraError

log = logging.getLogger(__name__)

TRAIN, VALIDATION = "train", "validation"
LABEL = "label"  # the label column of every dataset this package returns


class TsvFormatError(CoaloraError, ValueError):
    """A GLUE TSV file does not have the expected layout; the message names file and line."""


def read_tsv(
    path: str | os.PathLike,
    header: bool = True,
    columns: list[str] | None = None,
    skip_malformed: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """Column names and rows of a tab-separated file; fields are kept verbatim (quotes included).

    With ``header=False`` the names come from ``columns``. Empty lines are skipped. A row whose
    field count differs from the header's raises :class:`TsvFormatError` naming file and line
    (or is skipped with a warning when ``skip_malformed``).
    """
    names, rows, _ = _read_tsv_lines(path, header, columns, skip_malformed)
    return names, rows


def _read_tsv_lines(
    path: str | os.PathLike, header: bool, columns: list[str] | None, skip_malformed: bool
) -> tuple[list[str], list[list[str]], list[int]]:
    path = Path(path)
    names: list[str] | None = None if header else [str(c) for c in (columns or [])]
    if not header and not names:
        raise TsvFormatError(f"{path}: a header-less TSV needs the column names (task.columns)")
    rows: list[list[str]] = []
    linenos: list[int] = []
    skipped = 0
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if names is None:
            names = fields
            continue
        if len(fields) != len(names):
            if skip_malformed:
                skipped += 1
                continue
            raise TsvFormatError(
                f"{path}:{lineno}: expected {len(names)} tab-separated columns, found "
                f"{len(fields)} (GLUE TSV is split on tabs only; set task.skip_malformed=true "
                f"to drop such rows)"
            )
        rows.append(fields)
        linenos.append(lineno)
    if names is None:
        raise TsvFormatError(f"{path}: the file is empty (no header line)")
    if not rows and not skipped:
        what = "only a header line" if header else "only empty lines"
        raise TsvFormatError(f"{path}: no data rows ({what}); a split needs at least one example")
    if skipped:
        log.warning("%s: skipped %d malformed rows (task.skip_malformed=true)", path, skipped)
    return names, rows, linenos


def _decoded_lines(path: Path):
    """``(line number, text)`` per line, split on ``\\n`` only; the first line loses a UTF-8 BOM
    (MRPC). Bytes that are not UTF-8 raise :class:`TsvFormatError` naming file, line and column."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TsvFormatError(f"{path}: cannot read the file ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):  # binary iteration splits on b"\n" only
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TsvFormatError(
                    f"{path}:{lineno}: byte {e.start + 1} of the line (0x{raw[e.start]:02x}) is not "
                    f"UTF-8 (GLUE files are UTF-8; re-encode the file, e.g. with iconv)"
                ) from None
            yield lineno, text.removesuffix("\n").removesuffix("\r")


def convert_label(value, task: DictConfig, where: str) -> int | float:
    """Map a raw label (string from a TSV, int/float from the hub) to the training target.

    Regression -> float; ``task.label_names`` -> index of the name; otherwise an int id that
    must lie in ``[0, num_labels)``. ``where`` ("file:line") prefixes the error message.
    """
    if bool(task.is_regression):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TsvFormatError(f"{where}: regression target {value!r} is not a number") from None
    names = label_names(task)
    if names is not None and isinstance(value, str):
        try:
            return names.index(value.strip())
        except ValueError:
            raise TsvFormatError(
                f"{where}: label {value!r} is not one of task.label_names={names}"
            ) from None
    try:
        label = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise TsvFormatError(
            f"{where}: label {value!r} is not an integer class id (set task.label_names to map "
            f"string labels)"
        ) from None
    if not 0 <= label < int(task.num_labels):
        raise TsvFormatError(
            f"{where}: label {label} is outside [0, {task.num_labels}) (task.num_labels)"
        )
    return label


def read_glue_columns(path: str | os.PathLike, task: DictConfig) -> dict[str, list]:
    """The task's text columns (named as in ``task.text_fields``) plus ``label``, as lists."""
    header = bool(task_get(task, "header", True))
    columns = task_get(task, "columns")
    names, rows, linenos = _read_tsv_lines(
        path,
        header=header,
        columns=None if columns is None else [str(c) for c in columns],
        skip_malformed=bool(task_get(task, "skip_malformed", False)),
    )
    wanted = [*text_fields(task), str(task.label_field)]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise TsvFormatError(
            f"{path}: columns {missing} not found; the file has {names} "
            f"(check task.text_fields / task.label_field / task.columns)"
        )
    index = {c: names.index(c) for c in wanted}
    out: dict[str, list] = {f: [row[index[f]] for row in rows] for f in text_fields(task)}
    label_col = index[str(task.label_field)]
    out[LABEL] = [
        convert_label(row[label_col], task, f"{path}:{lineno}")
        for row, lineno in zip(rows, linenos)
    ]
    return out


def read_glue_tsv(path: str | os.PathLike, task: DictConfig):
    """A ``datasets.Dataset`` with the task's text columns and an int (float for STS-B) ``label``."""
    import datasets

    return datasets.Dataset.from_dict(read_glue_columns(path, task))


def task_file_candidates(data_dir: str | os.PathLike, task: DictConfig) -> list[Path]:
    """Folders that may hold the task's files: ``<data_dir>/glue/<glue_dir>``, ``<data_dir>/<glue_dir>``."""
    root = Path(os.path.expanduser(str(data_dir)))
    return [root / "glue" / str(task.glue_dir), root / str(task.glue_dir)]


def split_file_name(task: DictConfig, split: str) -> str:
    if split == TRAIN:
        return str(task.train_file)
    if split == VALIDATION:
        return str(task.eval_file)
    raise ValueError(f"unknown split {split!r}; allowed: [{TRAIN}, {VALIDATION}]")


def find_task_files(
    data_dir: str | os.PathLike | None,
    task: DictConfig,
    splits: tuple[str, ...] = (TRAIN, VALIDATION),
) -> dict[str, Path] | None:
    """``{split: path}`` of the task's local TSV files, or None unless every split is present."""
    if data_dir is None or str(data_dir) == "":
        return None
    for folder in task_file_candidates(data_dir, task):
        files = {s: folder / split_file_name(task, s) for s in splits}
        if all(p.is_file() for p in files.values()):
            return files
    return None


def expected_task_file(data_dir: str | os.PathLike | None, task: DictConfig, split: str) -> Path:
    """Where the error message says a split's file should be (the canonical layout)."""
    base = "<paths.data_dir>" if data_dir in (None, "") else data_dir
    return task_file_candidates(base, task)[0] / split_file_name(task, split)
