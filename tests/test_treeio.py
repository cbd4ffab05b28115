import numpy as np
import pytest

from fedsqueeze.errors import PayloadError
from fedsqueeze.treeio import pack_tree, unpack_tree


def test_tree_roundtrip():
    tree = {
        "weights": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)},
        3: [1, 2.5, None, True, "x", float("nan")],
        "t": (np.zeros(0, dtype=np.uint8), -7),
    }
    out = unpack_tree(pack_tree(tree))
    assert set(out) == {"weights", 3, "t"}
    np.testing.assert_array_equal(out["weights"]["a"], tree["weights"]["a"])
    assert out["weights"]["b"].dtype == np.int64
    assert out[3][:5] == [1, 2.5, None, True, "x"] and np.isnan(out[3][5])
    assert isinstance(out["t"], tuple) and out["t"][1] == -7
    out["weights"]["a"][0, 0] = 9  # writable copy


def test_tree_rejects_objects_and_garbage():
    with pytest.raises(TypeError):
        pack_tree({"f": object()})
    data = pack_tree({"a": np.ones(4)})
    with pytest.raises(PayloadError):
        unpack_tree(data[:-3])
