"""Read tabular data through the `datasets` library, with errors that say what to fix.

Sources: .jsonl / .json / .ndjson (optionally .gz), .parquet, .csv, a directory written by
`Dataset.save_to_disk`, or a hub dataset id where a hub is reachable. JSON lines are parsed by
tether itself first, so a malformed line is reported with its file name and line number.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tether.errors import DataError

_JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_json_lines(path: Path) -> list[dict]:
    """Parse JSON lines; a bad line raises DataError naming the file and the 1-based line."""
    rows = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # so a cut-off line reports its own last column
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}). "
                                "Each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    with _open_text(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return read_json_lines(path)  # many .json files are JSON lines in disguise
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON file must hold a list of objects (or JSON lines)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a JSON file must hold a list of objects (or JSON lines)")
    return data


def _rows_to_dataset(rows: list[dict], source: str) -> Any:
    from datasets import Dataset

    try:
        return Dataset.from_list(rows)
    except Exception as err:  # pyarrow type clashes between rows
        raise DataError(f"{source}: rows do not share one schema ({err}). Check that each column "
                        "holds the same type on every line.") from None


def load_rows(source: str, split: str = "train") -> Any:
    """Load `source` as a `datasets.Dataset`. Raises DataError with a fix-it message."""
    path = Path(source)
    if path.is_dir():
        ds = _load_saved(path, split)
    elif path.is_file():
        suffix = _base_suffix(path)
        if suffix in _JSON_SUFFIXES:
            rows = read_json_lines(path) if suffix != ".json" else _read_json(path)
            if not rows:
                raise DataError(f"{source} is empty: it holds no rows")
            ds = _rows_to_dataset(rows, source)
        elif suffix in {".parquet", ".csv"}:
            ds = _load_builder(suffix[1:], str(path))
        else:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, "
                            ".parquet, .csv or a saved dataset directory")
    else:
        ds = _load_hub(source, split)
    if len(ds) == 0:
        raise DataError(f"{source} is empty: it holds no rows")
    return ds


def _load_saved(path: Path, split: str) -> Any:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path} is a directory but not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return ds


def _load_builder(kind: str, path: str) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(kind, data_files=path, split="train")
    except Exception as err:
        raise DataError(f"{path}: could not read as {kind} ({err})") from None


def _load_hub(source: str, split: str) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(source, split=split)
    except Exception as err:
        raise DataError(f"{source} is not a file or directory here, and loading it as a hub "
                        f"dataset failed: {type(err).__name__}: {err}") from None


def require_columns(ds: Any, columns: Sequence[str], source: str,
                    may_be_empty: Sequence[str] = ()) -> None:
    """Every column must exist and be non-empty on every row (except `may_be_empty`, which may
    hold "" but not null); errors name what is wrong."""
    found = list(ds.column_names)
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{source} is missing column(s) {', '.join(repr(c) for c in missing)}; "
                        f"found columns: {', '.join(found) or '(none)'}")
    for col in columns:
        empty = [i + 1 for i, v in enumerate(ds[col])
                 if (v is None if col in may_be_empty else _is_empty(v))]
        if empty:
            shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            raise DataError(f"{source}: column {col!r} is empty in {len(empty)} row(s) (rows {shown}); "
                            f"found columns: {', '.join(found)}")


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and len(value) == 0)


def split_holdout(ds: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split off `fraction` of the rows (at least 1 when fraction > 0) as a held-out set."""
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    n_eval = max(1, int(round(len(ds) * fraction)))
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def iter_rows(ds: Any) -> Iterable[dict]:
    for i in range(len(ds)):
        yield ds[i]
