import numpy as np
import pytest

from fedsqueeze.data import dirichlet_partition, iid_partition, load_dataset
from fedsqueeze.errors import DataError


def test_wordnet_split_is_fixed_and_disjoint():
    a = load_dataset("wordnet", 500, 200)
    b = load_dataset("wordnet", 800, 200)
    assert a.num_classes == 26
    assert a.test.texts == b.test.texts  # the test split does not depend on the train size
    assert not set(a.test.texts) & set(b.train.texts)
    assert a.train.labels.min() >= 0 and a.train.labels.max() < 26


def test_fashion_mnist_loads():
    d = load_dataset("fashion-mnist", 300, 100)
    assert d.kind == "image" and d.train.images.shape == (300, 28, 28) and d.num_classes == 10


def test_csv_and_jsonl(tmp_path):
    rows = [{"sentence": f"text {i}", "y": "pos" if i % 2 else "neg"} for i in range(60)]
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    for name in ("d.csv", "d.jsonl"):
        d = load_dataset(str(tmp_path / name), 40, 10, text_column="sentence", label_column="y")
        assert d.label_names == ["neg", "pos"] and len(d.train) == 40 and len(d.test) == 10
    with pytest.raises(DataError, match="columns"):
        load_dataset(str(tmp_path / "d.csv"), 40, 10, text_column="nope", label_column="y")


def test_unknown_dataset():
    with pytest.raises(DataError, match="wordnet"):
        load_dataset("nosuch", 10, 10)


def test_partitions_cover_and_skew():
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    iid = iid_partition(len(labels), 7, rng)
    assert sorted(np.concatenate(iid).tolist()) == list(range(1000))
    skew = dirichlet_partition(labels, 7, 0.1, np.random.default_rng(0))
    assert sorted(np.concatenate(skew).tolist()) == list(range(1000))
    # label skew: with alpha=0.1 most clients are dominated by few classes
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in skew]
    assert np.median(top_share) > 0.4
    again = dirichlet_partition(labels, 7, 0.1, np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(skew, again))
