"""The public Python API: docs/api.md's examples run, the example plugin registers through its
entry points (a hand-made .dist-info on sys.path, no pip, no network), and bad plugins are refused."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest

import fedsqueeze
from fedsqueeze import plugins
from fedsqueeze.codecs import CODECS, CodecContext
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "plugin"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_docs_api_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "fedsz.toml", tmp_path / "examples" / "fedsz.toml")
    page = types.ModuleType("docs_api")  # a real module, so the page's dataclasses resolve their annotations
    monkeypatch.setitem(sys.modules, "docs_api", page)
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/api.md block {i + 1}", "exec"), page.__dict__)
    assert (tmp_path / "runs" / "api-example" / "results.json").is_file()
    assert "scaled-half" not in CODECS


def test_import_fedsqueeze_is_light_and_exports_the_api():
    import subprocess

    code = "import sys, fedsqueeze; print(sorted(m for m in ('torch', 'fedsqueeze.codecs', 'flwr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "[]"
    assert fedsqueeze.codec is fedsqueeze.api.codec and fedsqueeze.run is fedsqueeze.api.run
    assert all(getattr(fedsqueeze, name) is getattr(fedsqueeze.api, name) for name in fedsqueeze.api.__all__)
    with pytest.raises(AttributeError):
        fedsqueeze.no_such_name  # noqa: B018


def test_bits_per_param_is_exact():
    assert fedsqueeze.bits_per_param(b"x" * 100, {"a": np.zeros((10, 5)), "b": np.zeros(30)}) == 10.0
    assert fedsqueeze.bits_per_param(3, 8) == 3.0


def test_decode_needs_the_expected_tensors():
    c = fedsqueeze.codec("raw")
    t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    payload = fedsqueeze.encode(c, t)
    assert fedsqueeze.decode(payload, c, like={"w": ("float32", [2, 3])})["w"].tolist() == t["w"].tolist()
    for like in ({"w": ("float32", (3, 2))}, {"w": ("float64", (2, 3))}, {"v": ("float32", (2, 3))}):
        with pytest.raises(PayloadError):
            fedsqueeze.decode(payload, c, like=like)


# ---- plugins through entry points --------------------------------------------------------------
def install_dist(site: Path, name: str, entry_points: str, package: Path | None = None, module: str | None = None) -> None:
    """A minimal installed distribution: NAME-0.1.0.dist-info with METADATA and entry_points.txt."""
    info = site / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    if package is not None:
        shutil.copytree(package, site / package.name)
    if module is not None:
        (site / f"{name.replace('-', '_')}.py").write_text(module)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path; every plugin it adds is unregistered again afterwards."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    importlib.invalidate_caches()
    codecs, methods, failed = dict(CODECS), dict(METHODS), dict(plugins.FAILED)
    yield path
    for registry, before in ((CODECS, codecs), (METHODS, methods)):
        registry.clear()
        registry.update(before)
    plugins.FAILED.clear()
    plugins.FAILED.update(failed)
    for mod in [m for m in sys.modules if m.startswith(("fedsqueeze_uniform8", "bad_plugin"))]:
        del sys.modules[mod]


def example_entry_points() -> str:
    """The example's pyproject.toml entry points, as pip writes them into entry_points.txt."""
    groups = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]["entry-points"]
    assert set(groups) == {"fedsqueeze.codecs", "fedsqueeze.methods"}
    return "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in groups.items())


def test_example_plugin_registers_through_entry_points_and_runs(site, tiny_cfg):
    install_dist(site, "fedsqueeze-uniform8", example_entry_points(), package=PLUGIN / "fedsqueeze_uniform8")
    assert "uniform8" not in CODECS
    added = fedsqueeze.load_plugins()
    assert added == {"codecs": ["uniform8"], "methods": ["fedavg-u8"]}
    assert fedsqueeze.load_plugins() == {"codecs": [], "methods": []}  # a rescan adds nothing twice

    # the codec keeps its stated bound and sends one byte per float value
    codec = fedsqueeze.codec("uniform8")
    rng = np.random.default_rng(1)
    t = {"w": rng.normal(size=(40, 25)).astype(np.float32), "n": np.array([3, -4], dtype=np.int64)}
    meta, body = codec.encode(t, CodecContext())
    assert len(body) == 40 * 25 + 2 * 8
    back = fedsqueeze.decode(fedsqueeze.encode(codec, t), codec, like=t)
    span = float(t["w"].max() - t["w"].min())
    assert np.abs(back["w"] - t["w"]).max() <= span / 510 * (1 + 1e-6)
    assert back["n"].tolist() == [3, -4]

    # the method runs end to end; its uploads are uniform8 payloads: 8 bits a value plus headers
    res = fedsqueeze.run(tiny_cfg(method="fedavg-u8", rounds=1, clients=2, clients_per_round=2, local_steps=1, train_size=40, test_size=20))
    assert res["method"] == "fedavg-u8"
    assert 8.0 < res["rounds"][0]["uplink_bpp"] < 8.2


BAD_MODULE = """
from fedsqueeze.codecs.base import RawCodec, register_codec

@register_codec           # replaces the built-in raw codec as it is imported...
class Impostor(RawCodec):
    codec_id = "raw"      # ...and its entry point would too

class Misnamed(RawCodec):
    codec_id = "other-name"

NotACodec = object
"""


def test_bad_plugins_are_refused_with_a_reason(site, caplog):
    entry_points = (
        "[fedsqueeze.codecs]\n"
        "raw = bad_plugin:Impostor\n"
        "mine = bad_plugin:Misnamed\n"
        "thing = bad_plugin:NotACodec\n"
        "gone = no_such_module_here:X\n"
        "[fedsqueeze.methods]\n"
        "fedavg = bad_plugin:Impostor\n"
    )
    install_dist(site, "bad-plugin", entry_points, module=BAD_MODULE)
    raw = CODECS["raw"]
    assert fedsqueeze.load_plugins() == {"codecs": [], "methods": []}
    assert CODECS["raw"] is raw and "mine" not in CODECS and "thing" not in CODECS
    why = plugins.FAILED
    assert "never replaces" in why["fedsqueeze.codecs:raw"]
    assert "'other-name', not the entry point's name 'mine'" in why["fedsqueeze.codecs:mine"]
    assert "not a subclass" in why["fedsqueeze.codecs:thing"]
    assert "cannot be imported: ModuleNotFoundError" in why["fedsqueeze.codecs:gone"]
    assert "not a subclass of fedsqueeze.methods.base.Method" in why["fedsqueeze.methods:fedavg"]
    assert sum("not registered" in r.getMessage() for r in caplog.records) == 5
