"""Text corpora: the embedded offline default and any ``datasets`` dataset.

Why an embedded default: every Python install carries its standard library source and the
``pydoc_data`` help topics, so pretraining runs with no download at all. The train/validation
split is a stable hash of each document's relative path, so a document's split never depends
on the machine, the file order or ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:  # `datasets` loads on first use: `import hf_extras` (which imports hf_extras.data) stays light
    from datasets import Dataset, DatasetDict

__all__ = [
    "iter_default_documents", "load_dataset_dict", "load_default_corpus", "load_text_dataset", "rename_validation_alias",
    "stable_fraction",
]  # fmt: skip

# Directory names never descended into: installed packages and the stdlib's own test suites
# (``test/``, ``tests/``, ``idlelib/idle_test``, ``lib2to3/tests``, ``ctypes/test``, ...).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_VALIDATION_ALIASES = ("validation", "valid", "val", "dev")
_LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}


def stable_fraction(key: str) -> float:
    """Map ``key`` to [0, 1) with SHA-256: identical on every machine and process."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _stdlib_files(root: Path) -> list[Path]:
    """Sorted ``*.py`` files under ``root``, pruning skipped directories while walking."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def iter_default_documents() -> list[tuple[str, str]]:
    """All ``(source, text)`` pairs of the default corpus, in a fixed order.

    Standard-library ``*.py`` files (UTF-8 only, non-empty), sorted by relative POSIX path,
    then the ``pydoc_data.topics`` texts sorted by topic name (``source="pydoc_data:<topic>"``).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    for path in _stdlib_files(root):
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((path.relative_to(root).as_posix(), text))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds strip pydoc_data
        topics = {}
    for name in sorted(topics):
        if topics[name].strip():
            docs.append((f"pydoc_data:{name}", topics[name]))
    return docs


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")


def load_default_corpus(validation_fraction: float = 0.02, max_documents: int | None = None) -> DatasetDict:
    """The offline default pretraining corpus as ``DatasetDict(train=..., validation=...)``.

    Columns: ``text`` and ``source`` (stdlib-relative path or ``pydoc_data:<topic>``). A
    document is in validation iff ``stable_fraction(source) < validation_fraction``.
    ``max_documents`` keeps a small deterministic subset for quick tests: the documents with the
    lowest hash within each split, ``max(1, round(max_documents * validation_fraction))`` of them
    from validation and the rest from train, so both splits stay non-empty.
    """
    from datasets import Dataset, DatasetDict

    _check_fraction(validation_fraction)
    if max_documents is not None and max_documents < 2:
        raise ValueError(f"max_documents must be >= 2 (one per split), got {max_documents}")

    splits: dict[str, list[tuple[float, str, str]]] = {"train": [], "validation": []}
    for source, text in iter_default_documents():
        h = stable_fraction(source)
        splits["validation" if h < validation_fraction else "train"].append((h, source, text))

    if max_documents is not None:
        n_val = min(len(splits["validation"]), max(1, round(max_documents * validation_fraction)))
        caps = {"validation": n_val, "train": max_documents - n_val}
        for name, docs in splits.items():
            keep = {source for _, source, _ in sorted(docs)[: caps[name]]}
            splits[name] = [d for d in docs if d[1] in keep]  # keep the corpus order

    if not splits["train"] or not splits["validation"]:
        raise RuntimeError(
            f"default corpus split is empty (train={len(splits['train'])}, "
            f"validation={len(splits['validation'])}); raise validation_fraction or max_documents"
        )
    return DatasetDict(
        {
            name: Dataset.from_dict({"text": [d[2] for d in docs], "source": [d[1] for d in docs]})
            for name, docs in splits.items()
        }
    )


def _is_blank(path: Path, probe: int = 1 << 16) -> bool:
    """True for a file with no bytes or only whitespace (files larger than `probe` bytes are never blank here)."""
    size = path.stat().st_size
    return size == 0 or (size <= probe and not path.read_bytes().strip())


def load_dataset_dict(
    name_or_path: str, data_files: str | list[str] | dict | None, config_name: str | None
) -> DatasetDict:
    """``datasets.load_dataset`` for a local file, a local folder or a Hub/builder name."""
    from datasets import Dataset, DatasetDict, load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = Path(name_or_path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        builder = _LOCAL_BUILDERS.get(suffix)
        if builder is None:
            raise ConfigError(f"unsupported file type {suffix!r} for {path}; use one of {sorted(_LOCAL_BUILDERS)}")
        if _is_blank(path):  # datasets ends in a bare StopIteration (json) or a schema error (text) on these
            raise ConfigError(f"data file {str(path)!r} is empty: it holds no examples")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            ds = load_dataset(builder, data_files={"train": str(path)}, **kwargs)
        except (StopIteration, DatasetGenerationError) as error:  # unreadable as `builder`: name the file
            cause = error.__cause__ or error
            raise ConfigError(
                f"data file {str(path)!r} could not be read as {builder}: {type(cause).__name__}: {cause}"
            ) from error
    else:
        # A folder (builder inferred from its files), a builder name such as "json" with
        # data_files, or a Hub dataset name.
        ds = load_dataset(str(path) if path.is_dir() else name_or_path, config_name, data_files=data_files)
    if isinstance(ds, Dataset):
        ds = DatasetDict(train=ds)
    if not isinstance(ds, DatasetDict):
        raise TypeError(f"expected a DatasetDict from {name_or_path!r}, got {type(ds).__name__}")
    return ds


def rename_validation_alias(ds: DatasetDict) -> DatasetDict:
    """Rename a `valid`/`val`/`dev` split to `validation` in place (when there is no `validation` split yet)."""
    if "validation" not in ds:
        alias = next((a for a in _VALIDATION_ALIASES if a in ds), None)
        if alias is not None:
            ds["validation"] = ds.pop(alias)
    return ds


def load_text_dataset(
    name_or_path: str | None,
    *,
    text_column: str = "text",
    validation_fraction: float = 0.02,
    data_files: str | list[str] | dict | None = None,
    config_name: str | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Load a text dataset with ``train`` and ``validation`` splits and a ``text`` column.

    ``None`` gives the embedded default corpus. Otherwise ``name_or_path`` is a local file
    (json/jsonl/csv/tsv/txt/parquet), a local folder, or a ``datasets`` Hub/builder name. A
    ``valid``/``val``/``dev`` split is renamed ``validation``; without one, ``validation`` is
    carved from ``train`` with ``train_test_split(seed=seed)``. Other splits (e.g. ``test``) and
    columns are kept.
    """
    _check_fraction(validation_fraction)
    if name_or_path is None:
        return load_default_corpus(validation_fraction=validation_fraction)

    ds = load_dataset_dict(name_or_path, data_files, config_name)
    for name in list(ds):
        ds[name] = _with_text_column(ds[name], text_column, name_or_path, name)

    rename_validation_alias(ds)
    if "train" not in ds:
        raise ConfigError(f"dataset {name_or_path!r} has no 'train' split (splits: {sorted(ds)})")
    if "validation" not in ds:
        n = len(ds["train"])
        if n < 2:
            raise ConfigError(f"cannot carve a validation split from {n} training row(s) of {name_or_path!r}")
        n_val = min(n - 1, max(1, round(n * validation_fraction)))
        parts = ds["train"].train_test_split(test_size=n_val, seed=seed, shuffle=True)
        ds["train"], ds["validation"] = parts["train"], parts["test"]
    from datasets import DatasetDict

    order = ["train", "validation"] + [s for s in ds if s not in ("train", "validation")]
    return DatasetDict({s: ds[s] for s in order})


def _with_text_column(split: Dataset, text_column: str, name: str, split_name: str) -> Dataset:
    """Rename ``text_column`` to ``text``; a clear error when it is missing."""
    columns = split.column_names
    if text_column not in columns:
        raise ConfigError(
            f"text column {text_column!r} not found in split {split_name!r} of {name!r}; "
            f"available columns: {columns}. Pass text_column=<one of them>."
        )
    if text_column != "text":
        if "text" in columns:
            split = split.remove_columns("text")
        split = split.rename_column(text_column, "text")
    return split
