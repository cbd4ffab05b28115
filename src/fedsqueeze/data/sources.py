"""Dataset sources, all readable offline.

- ``wordnet``: WordNet 3 noun glosses → one of 26 supersenses (the lexicographer file, field 2 of
  ``data.noun``), from Debian's ``wordnet-base``.
- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist``.
- ``path/to/file.csv|.jsonl|.parquet``: a local table with a text and a label column.
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset through ``datasets`` (needs the Hub or its cache).

Each source returns a :class:`RawSplit` pair (train pool, test) of at most the requested sizes.
The split is fixed: it depends on ``SPLIT_SEED`` only, never on the run seed, so every run of every
method is tested on the same held-out examples.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsqueeze.errors import DataError

SPLIT_SEED = 20240101
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# lexicographer files 03..28 are the 26 noun supersenses
NOUN_SUPERSENSES = [
    "Tops",
    "act",
    "animal",
    "artifact",
    "attribute",
    "body",
    "cognition",
    "communication",
    "event",
    "feeling",
    "food",
    "group",
    "location",
    "motive",
    "object",
    "person",
    "phenomenon",
    "plant",
    "possession",
    "process",
    "quantity",
    "relation",
    "shape",
    "state",
    "substance",
    "time",
]
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class RawSplit:
    """One split before model-specific encoding: texts or images, and integer labels."""

    labels: np.ndarray  # int64 [N]
    texts: list[str] | None = None
    images: np.ndarray | None = None  # uint8 [N, H, W]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> RawSplit:
        return RawSplit(
            labels=self.labels[idx],
            texts=[self.texts[i] for i in idx] if self.texts is not None else None,
            images=self.images[idx] if self.images is not None else None,
        )


@dataclass
class RawDataset:
    name: str
    kind: str  # "text" | "image"
    train: RawSplit
    test: RawSplit
    label_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _missing(path: Path, package: str) -> DataError:
    return DataError(f"{path} not found. Install the Debian package: `sudo apt-get install -y {package}` (or run `make setup` as root).")


def _split_pool(full: RawSplit, train_size: int, test_size: int) -> tuple[RawSplit, RawSplit]:
    """Seeded, fixed split of one pool into disjoint test and train parts."""
    if train_size + test_size > len(full):
        raise DataError(f"asked for {train_size}+{test_size} examples but the dataset has {len(full)}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(full))
    return full.take(perm[test_size : test_size + train_size]), full.take(perm[:test_size])


def load_wordnet(train_size: int, test_size: int, path: Path = WORDNET_NOUNS) -> RawDataset:
    """WordNet noun gloss → supersense (26 classes)."""
    if not path.is_file():
        raise _missing(path, "wordnet-base")
    texts, labels = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            fields_, _, gloss = line.partition("|")
            lexfile = int(fields_.split()[1])
            texts.append(gloss.strip())
            labels.append(lexfile - 3)
    full = RawSplit(labels=np.asarray(labels, dtype=np.int64), texts=texts)
    train, test = _split_pool(full, train_size, test_size)
    return RawDataset("wordnet", "text", train, test, list(NOUN_SUPERSENSES))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file")
    zero, dtype_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file")
    shape = struct.unpack_from(">" + "I" * ndim, data, 4)
    offset = 4 + 4 * ndim
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(train_size: int, test_size: int, root: Path = FASHION_MNIST_DIR) -> RawDataset:
    """Fashion-MNIST 28×28 grey images, 10 classes; test examples come from the official test file."""
    files = {k: root / f"{k}-ubyte.gz" for k in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    for p in files.values():
        if not p.is_file():
            raise _missing(p, "dataset-fashion-mnist")
    rng = np.random.default_rng(SPLIT_SEED)

    def part(images: np.ndarray, labels: np.ndarray, n: int) -> RawSplit:
        if n > len(labels):
            raise DataError(f"asked for {n} examples, the file has {len(labels)}")
        idx = np.sort(rng.permutation(len(labels))[:n])
        return RawSplit(labels=labels[idx].astype(np.int64), images=images[idx])

    train = part(_read_idx(files["train-images-idx3"]), _read_idx(files["train-labels-idx1"]), train_size)
    test = part(_read_idx(files["t10k-images-idx3"]), _read_idx(files["t10k-labels-idx1"]), test_size)
    return RawDataset("fashion-mnist", "image", train, test, list(FASHION_MNIST_LABELS))


def _from_table(name: str, texts: list, labels: list, train_size: int, test_size: int) -> RawDataset:
    label_names = sorted({str(x) for x in labels})
    index = {n: i for i, n in enumerate(label_names)}
    full = RawSplit(
        labels=np.asarray([index[str(x)] for x in labels], dtype=np.int64),
        texts=[str(t) for t in texts],
    )
    n = len(full)
    train_n, test_n = min(train_size, n - min(test_size, n // 5)), min(test_size, n // 5)
    if test_n < 1 or train_n < 1:
        raise DataError(f"{name}: too few rows ({n}) for a train/test split")
    train, test = _split_pool(full, train_n, test_n)
    return RawDataset(name, "text", train, test, label_names)


def load_table(path: Path, text_column: str, label_column: str, train_size: int, test_size: int) -> RawDataset:
    """A local .csv / .jsonl / .parquet file with a text and a label column."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path)
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suffix == ".jsonl")
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise DataError(f"unsupported dataset file type {suffix!r}; use .csv, .jsonl or .parquet")
    except DataError:
        raise
    except Exception as exc:  # pandas raises many types for malformed files
        raise DataError(f"cannot read {str(path)!r}: {exc}") from exc
    for col in (text_column, label_column):
        if col not in df.columns:
            raise DataError(
                f"{path.name} has no column {col!r}; columns are {list(df.columns)}. Choose with --set text_column=... label_column=..."
            )
    df = df[[text_column, label_column]].dropna()
    return _from_table(path.name, df[text_column].tolist(), df[label_column].tolist(), train_size, test_size)


def load_hf(spec: str, text_column: str, label_column: str, train_size: int, test_size: int) -> RawDataset:
    """``hf:NAME[:CONFIG]`` through HF datasets; uses its 'train' (and 'test' if present) splits."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as exc:  # network, missing dataset, bad config: all one message
        raise DataError(f"cannot load Hugging Face dataset {spec!r}: {exc}") from exc
    if "train" not in ds:
        raise DataError(f"dataset {spec!r} has no 'train' split (splits: {list(ds)})")
    cols = ds["train"].column_names
    for col in (text_column, label_column):
        if col not in cols:
            raise DataError(f"dataset {spec!r} has no column {col!r}; columns are {cols}")
    if "test" not in ds:
        tr = ds["train"]
        return _from_table(spec, tr[text_column], tr[label_column], train_size, test_size)
    tr, te = ds["train"], ds["test"]
    label_names = sorted({str(x) for x in tr[label_column]} | {str(x) for x in te[label_column]})
    index = {n: i for i, n in enumerate(label_names)}
    rng = np.random.default_rng(SPLIT_SEED)

    def part(split, n: int) -> RawSplit:
        idx = np.sort(rng.permutation(len(split))[: min(n, len(split))])
        rows = split.select(idx.tolist())
        return RawSplit(
            labels=np.asarray([index[str(x)] for x in rows[label_column]], dtype=np.int64),
            texts=[str(t) for t in rows[text_column]],
        )

    return RawDataset(spec, "text", part(tr, train_size), part(te, test_size), label_names)


BUILTIN_DATASETS = ("wordnet", "fashion-mnist")


def load_dataset(name: str, train_size: int, test_size: int, text_column: str = "text", label_column: str = "label") -> RawDataset:
    """Resolve a dataset name (built-in, file path, or ``hf:``) and load it."""
    if name == "wordnet":
        return load_wordnet(train_size, test_size)
    if name == "fashion-mnist":
        return load_fashion_mnist(train_size, test_size)
    if name.startswith("hf:"):
        return load_hf(name[3:], text_column, label_column, train_size, test_size)
    path = Path(name)
    if path.suffix.lower() in (".csv", ".jsonl", ".json", ".parquet"):
        return load_table(path, text_column, label_column, train_size, test_size)
    raise DataError(
        f"unknown dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}, a .csv/.jsonl/.parquet file, or hf:NAME[:CONFIG]"
    )
