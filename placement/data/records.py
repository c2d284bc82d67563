"""Read task data into records: a builtin task, a local JSON/JSONL/CSV/Parquet file or a hub dataset.

Records come in one of three shapes: Alpaca (`instruction`, optional `input`, `output`, optional `answer`), chat
(`messages`) or plain `text`; `examples.py` turns them into prompt/response examples.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from ..errors import PlacementError

DEFAULT_BUILTIN_SIZE = 4000
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(PlacementError):
    """A user-caused data problem; the message is one line: what is wrong and what to do."""


def arithmetic_records(n: int, seed: int) -> list[dict]:
    """`n` distinct two-number sums, differences and products with exact answers, deterministic from `seed`."""
    operand_ranges = {"+": (99, 99), "-": (99, 99), "*": (12, 99)}
    capacity = sum((a + 1) * (b + 1) for a, b in operand_ranges.values())
    if n < 1 or n > capacity:
        raise DataError(f"builtin:arithmetic has {capacity} distinct questions, not {n}: pass --n between 1 and {capacity}")
    rng = random.Random(seed)
    ops = sorted(operand_ranges)
    seen: set[str] = set()
    records = []
    while len(records) < n:
        op = rng.choice(ops)
        high_a, high_b = operand_ranges[op]
        a, b = rng.randint(0, high_a), rng.randint(0, high_b)
        question = f"What is {a} {op} {b}?"
        if question in seen:
            continue
        seen.add(question)
        answer = str(a + b if op == "+" else a - b if op == "-" else a * b)
        records.append({"instruction": question, "input": "", "output": answer, "answer": answer})
    return records


BUILTINS = {"arithmetic": arithmetic_records}


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


def _first_line(err: BaseException) -> str:
    """The most specific one-line reason: libraries often wrap the real parse error in a generic one."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _looks_like_path(spec: str) -> bool:
    """A file name rather than a hub data set: it has a file extension, starts like a path, or has more folders
    than a hub name's one `org/name` separator. A mistyped file must not be looked up on a hub."""
    has_extension = re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,7}", Path(spec).suffix) is not None
    return has_extension or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _csv_as_text(path: Path) -> dict:
    """Read every CSV column as text: inferred types would turn an answer column holding 7 and a blank into 7.0."""
    import pandas as pd
    from datasets import Features, Value

    columns = pd.read_csv(path, nrows=0).columns
    return {"features": Features({name: Value("string") for name in columns})}


def _check_utf8(path: Path, spec: str) -> None:
    """A text file in another encoding is named as such, not as a parser's error; read in chunks, so a large file
    costs no memory."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataError(f"data file {spec} is not UTF-8 text (byte {offset + err.start}): "
                                "save it as UTF-8") from err
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise DataError(f"data file {spec} is not UTF-8 text (it ends inside a character): save it as UTF-8") from err


def _load_file(path: Path, spec: str):
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a local file loads in a blink; its bars would only clutter error lines

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data file {spec} has unsupported extension '{path.suffix}': pass a .json, .jsonl, .csv or .parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {spec} is empty: pass a file with at least one record")
    if builder != "parquet":
        _check_utf8(path, spec)
    try:
        options = _csv_as_text(path) if builder == "csv" else {}
        return load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # parse errors surface as many types, from pyarrow, json and datasets
        raise DataError(f"cannot read data file {spec} as {builder.upper()}: {_first_line(err)}") from err


def _load_named(name: str):
    """A hub dataset, or a local dataset folder, which `load_dataset` reads the same way."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split="train")
    except Exception as err:  # network, missing dataset and missing split all arrive as different types
        raise DataError(f"cannot load dataset '{name}': {_first_line(err)}; pass a local file or builtin:arithmetic") from err


def load_records(spec: str, *, seed: int = 0, n: int | None = None) -> list[dict]:
    """Records from `builtin:NAME`, a local data file or a hub dataset name. `n` caps the count: for a builtin it is
    the number generated (default 4000), for a file or dataset the first `n` records are kept. `seed` drives builtins."""
    if n is not None and n < 1:
        raise DataError(f"--n {n} asks for no records: pass a positive number or leave it out")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise DataError(f"unknown builtin task '{name}': choose one of {', '.join(builtin_names())}")
        return BUILTINS[name](DEFAULT_BUILTIN_SIZE if n is None else n, seed)
    path = Path(spec).expanduser()
    if path.is_file():
        dataset = _load_file(path, spec)
    elif path.is_dir() or not _looks_like_path(spec):
        dataset = _load_named(str(path) if path.is_dir() else spec)
    else:
        raise DataError(f"data file {spec} not found: pass an existing JSON/JSONL/CSV/Parquet file, builtin:arithmetic "
                        "or a hub data set name")
    if len(dataset) == 0:
        raise DataError(f"{spec} holds no records: pass data with at least one record")
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    return dataset.to_list()
