"""Read tabular data through the `datasets` library, with errors that say what to fix.

Sources: .jsonl / .json / .ndjson (optionally .gz), .parquet, .csv, a directory written by
`Dataset.save_to_disk`, or a hub dataset id where a hub is reachable. JSON lines are parsed by
tether itself first, so a malformed line is reported with its file name and line number.

Every loaded row carries where it came from in the hidden column `LINE` (":6" for line 6 of a
JSON-lines or CSV file, " row 6" otherwise), so that an error found after the rows were split
or shuffled still names the file and line: `where(source, row)`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Sequence

from tether.errors import DataError

_JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
LINE = "__tether_line__"  # where a row came from: ":6" (line 6) or " row 6"


def where(source: str, row: dict, index: int = -1) -> str:
    """`source:line` (or `source row n`) of a loaded row, for error messages."""
    if LINE in row:
        return f"{source}{row[LINE]}"
    return f"{source} row {index + 1}"


def visible_columns(ds: Any) -> list[str]:
    return [c for c in ds.column_names if c != LINE]


def without_location(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != LINE}


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}). Re-encode the file as UTF-8, for example "
                        f"`iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl` for Latin-1.") from None


def _text_lines(path: Path):
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, _decode(raw, path, lineno)


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_json_lines(path: Path, located: bool = False) -> list[dict]:
    """Parse JSON lines; a bad line raises DataError naming the file and the 1-based line.
    `located`: each row gets its line in the LINE column."""
    rows = []
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line.rstrip("\r\n"))  # so a cut-off line reports its own last column
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}). "
                            "Each line must be one JSON object.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if located:
            row[LINE] = f":{lineno}"
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    text = "".join(line for _, line in _text_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return read_json_lines(path, located=True)  # many .json files are JSON lines in disguise
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON file must hold a list of objects (or JSON lines)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a JSON file must hold a list of objects (or JSON lines)")
    return [{**r, LINE: f" item {i + 1}"} for i, r in enumerate(data)]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _rows_to_dataset(rows: list[dict], source: str) -> Any:
    """Rows -> a Dataset with every column any row has (a row without one holds null there:
    `Dataset.from_list` alone would keep only the first row's columns)."""
    from datasets import Dataset

    columns = list(dict.fromkeys(col for row in rows for col in row))
    try:
        return Dataset.from_dict({col: [row.get(col) for row in rows] for col in columns})
    except Exception as err:  # pyarrow type clashes between rows: name the first one
        first: dict[str, tuple[str, str]] = {}
        for i, row in enumerate(rows):
            for col, value in row.items():
                if value is None or col == LINE:
                    continue
                kind = _kind(value)
                seen = first.setdefault(col, (kind, where(source, row, i)))
                if seen[0] != kind:
                    raise DataError(f"{where(source, row, i)}: column {col!r} holds a {kind} where "
                                    f"{seen[1]} holds a {seen[0]}; every row must give a column "
                                    "the same type") from None
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
            rows = read_json_lines(path, located=True) if suffix != ".json" else _read_json(path)
            if not rows:
                raise DataError(f"{source} is empty: it holds no rows")
            ds = _rows_to_dataset(rows, source)
        elif suffix in {".parquet", ".csv"}:
            ds = _load_builder(suffix[1:], str(path))
            first = 2 if suffix == ".csv" else 1  # a CSV's line 1 is its header
            ds = ds.add_column(LINE, [(":" if suffix == ".csv" else " row ") + str(i + first)
                                      for i in range(len(ds))])
        else:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, "
                            ".parquet, .csv or a saved dataset directory")
    else:
        ds = _load_hub(source, split)
    if LINE not in ds.column_names:
        ds = ds.add_column(LINE, [f" row {i + 1}" for i in range(len(ds))])
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

    if looks_like_path(source):
        raise DataError(f"{source}: no such file or directory")
    try:
        return load_dataset(source, split=split)
    except Exception as err:
        raise DataError(f"{source} is not a file or directory here, and loading it as a hub "
                        f"dataset failed: {type(err).__name__}: {err}") from None


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a hub id is `name` or `owner/name`)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name \
        or Path(name).suffix.lower() in {".jsonl", ".json", ".ndjson", ".gz", ".parquet", ".csv"}


def require_columns(ds: Any, columns: Sequence[str], source: str,
                    may_be_empty: Sequence[str] = (), text: Sequence[str] = ()) -> None:
    """Every column must exist and be non-empty on every row (except `may_be_empty`, which may
    hold "" but not null); a response of whitespace alone counts as empty. The `text` columns
    must hold strings (a number is not silently turned into one). Errors name the file and line."""
    found = visible_columns(ds)
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{source} is missing column(s) {', '.join(repr(c) for c in missing)}; "
                        f"found columns: {', '.join(found) or '(none)'}")
    locations = ds[LINE] if LINE in ds.column_names else [f" row {i + 1}" for i in range(len(ds))]
    for col in columns:
        values = ds[col]
        if col in text:
            wrong = next(((loc, v) for loc, v in zip(locations, values)
                          if v is not None and not isinstance(v, str)), None)
            if wrong is not None:
                raise DataError(f"{source}{wrong[0]}: column {col!r} holds a {_kind(wrong[1])} "
                                f"({wrong[1]!r}), not a string; quote it in the data")
        empty = [loc for loc, v in zip(locations, values)
                 if (v is None if col in may_be_empty else _is_empty(v))]
        if empty:
            shown = ", ".join(f"{source}{loc}" for loc in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise DataError(f"column {col!r} is empty (or whitespace only) in {len(empty)} row(s): "
                            f"{shown}; found columns: {', '.join(found)}")


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, (list, dict)) and len(value) == 0)


def split_holdout(ds: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split off `fraction` of the rows (at least 1 when fraction > 0) as a held-out set."""
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    n_eval = max(1, int(round(len(ds) * fraction)))
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
