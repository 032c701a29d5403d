"""Write a servable model repository for one runtime: our repository plus the exported model files.

The copy keeps every model (preprocessing, dspark, ensemble, ...) and sets the dspark model's
parameters (runtime, dtype, model, sizes) in its config.pbtxt. For onnxruntime / tensorrt the
ONNX graph is exported (or taken from the cache) and shipped in ``dspark/1/onnx/``, so the
server never exports at start; TensorRT engines are GPU-specific and are built from that graph
on the serving machine at first load (cached by content hash). The graph outputs the hidden
states the configured drafter taps, so a trained DSpark drafter serves on every runtime; for
onnxruntime the drafter's own graphs ship too, in ``dspark/1/drafter_onnx/``.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from export.drafter_export import cached_drafter_export, drafter_dtype
from export.onnx_export import EXPORT_FILES, ONNX_FILE, cached_onnx, read_metadata
from export.output_dir import write_replacing
from hub.fetch import KNOWN_MODELS, default_drafter, model_dir_if_cached, model_name
from models.drafters import BlockDrafter, DrafterConfig, load_drafter
from models.config import TransformerConfig
from models.loading import load_config, load_transformer
from orchestrator.drafting import LOOKUP_FIRST_SUFFIX, check_drafter_fits, split_lookup_first
from runtimes.protocol import RUNTIMES, check_runtime_dtype

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODEL = "dspark"
ONNX_SUBDIR = "onnx"
DRAFTER_SUBDIR = "drafter_onnx"
BUILD_MARKER = ".dspark-build"  # in every repository build writes: the one kind of directory it replaces
# What each runtime runs in by default: ONNX Runtime's CPU kernels want float32; TensorRT fp16.
DEFAULT_DTYPE = {"torch": "auto", "onnxruntime": "float32", "tensorrt": "float16"}


def set_parameters(config_text: str, values: dict[str, str]) -> str:
    """Set ``parameters`` entries of a config.pbtxt (replace the value, or append the entry)."""
    for key, value in values.items():
        line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        pattern = re.compile(rf'^parameters\s*\{{\s*key:\s*"{re.escape(key)}".*$', re.MULTILINE)
        config_text, n = pattern.subn(line.replace("\\", "\\\\"), config_text)
        if n == 0:
            config_text = config_text.rstrip("\n") + "\n" + line + "\n"
    return config_text


def read_parameters(config_text: str) -> dict[str, str]:
    """The string parameters of a config.pbtxt."""
    pattern = r'parameters\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}'
    return dict(re.findall(pattern, config_text))


def build_repository(out_dir: Path, runtime: str, model: str, model_dir: Path, dtype: str | None = None,
                     parameters: dict[str, str] | None = None, source: Path | None = None) -> Path:
    """Write the repository for ``runtime`` into ``out_dir`` (replacing an earlier build there); returns it.

    model: the name (or path) written into config.pbtxt; model_dir: its fetched HF directory.
    Built beside ``out_dir`` and moved into place once complete, so a failed build leaves the earlier one
    as it was. ValueError for an ``out_dir`` that is neither new, empty, nor a build of ours (its marker
    file): never delete what a user keeps there.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    source = source or PROJECT_ROOT / "model_repository"
    dtype = dtype or DEFAULT_DTYPE[runtime]
    check_runtime_dtype(runtime, dtype)  # a repository that could never load is refused before it is written
    if Path(out_dir).resolve() == source.resolve():
        raise ValueError("the output directory must differ from the source repository")
    return write_replacing(out_dir, BUILD_MARKER, "`cli.py build`",
                           lambda tmp: _write_repository(tmp, source, runtime, model, model_dir, dtype, parameters))


def _write_repository(out_dir: Path, source: Path, runtime: str, model: str, model_dir: Path, dtype: str,
                      parameters: dict[str, str] | None) -> None:
    shutil.copytree(source, out_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out_dir / BUILD_MARKER).write_text(f"written by cli.py build (runtime {runtime}); build replaces this directory\n")
    config = out_dir / ENGINE_MODEL / "config.pbtxt"
    values = {"model": model, "runtime": runtime, "dtype": dtype, "onnx_model": "", "drafter_onnx": "",
              **(parameters or {})}
    if runtime != "torch":
        # A trained drafter reads the target's hidden states: the graph exports the layers it taps.
        drafter = values.get("drafter") or read_parameters(config.read_text()).get("drafter", "none")
        if split_lookup_first(drafter)[0] == "auto":  # the graph exports this drafter's taps: name it
            base, lookup_first = resolve_drafter(drafter, model_dir)
            drafter = values["drafter"] = base + (LOOKUP_FIRST_SUFFIX if lookup_first else "")
        exported = cached_onnx(model_dir, dtype, drafter_tap_layers(drafter))
        target = out_dir / ENGINE_MODEL / "1" / ONNX_SUBDIR
        target.mkdir(parents=True)
        for name in EXPORT_FILES:
            _link_or_copy(exported.parent / name, target / name)
        values["onnx_model"] = f"{ONNX_SUBDIR}/{ONNX_FILE}"
        if runtime == "onnxruntime" and (graphs := _drafter_graphs(drafter, model_dir, dtype)) is not None:
            shipped = out_dir / ENGINE_MODEL / "1" / DRAFTER_SUBDIR
            shipped.mkdir()
            for path in graphs.iterdir():
                _link_or_copy(path, shipped / path.name)
            values["drafter_onnx"] = DRAFTER_SUBDIR
    config.write_text(set_parameters(config.read_text(), values))


def resolve_drafter(setting: str, model_dir: Path) -> tuple[str, bool]:
    """A server's drafter setting -> (the drafter it names, ``auto`` resolved to the target's default;
    whether prompt lookup goes first). ValueError for ``+prompt_lookup`` after ``none`` or ``prompt_lookup``;
    ``auto`` on a target whose default is prompt lookup gives prompt lookup alone."""
    base, lookup_first = split_lookup_first(setting)
    if base == "auto":  # the target's default, itself possibly lookup-first
        base, default_lookup_first = split_lookup_first(default_drafter(model_dir))
        lookup_first = lookup_first or default_lookup_first
    elif lookup_first and (base in ("none", "prompt_lookup") or split_lookup_first(base)[1]):
        raise ValueError(f"drafter '{setting}': {LOOKUP_FIRST_SUFFIX} goes after auto, model:<name> or "
                         "checkpoint:<dir>, once")
    return base, lookup_first and base not in ("none", "prompt_lookup")


def check_graph_source(onnx_path: Path, model_dir: Path) -> None:
    """ValueError for a shipped graph exported from another model than the one a server loads."""
    source = read_metadata(onnx_path).get("source")
    if source and source != model_dir.name:
        raise ValueError(f"{onnx_path} was exported from {source}, but this server loads {model_dir.name}: serve the "
                         f"model the repository was built for (cli.py serve --model {source}), or build one for "
                         f"{model_dir.name}")


DRAFTER_SETTINGS = ("auto | none | prompt_lookup | model:<name or dir> | checkpoint:<dir>; auto, model: and checkpoint: "
                    "may end in +prompt_lookup")


def check_drafter_setting(setting: str, model_dir: Path) -> tuple[str, bool]:
    """`resolve_drafter`, then refuse what a server could not load, from configuration files alone
    (before any weights load): an unknown form, a drafter model that is not fetched, a checkpoint
    directory without a drafter, a drafter that does not fit the target (DrafterMismatchError, naming
    both). ValueError for the others."""
    base, lookup_first = resolve_drafter(setting, model_dir)
    if base in ("none", "prompt_lookup"):
        return base, lookup_first
    if base.startswith("model:"):
        drafter_dir = model_dir_if_cached(model := base[len("model:"):])
        if drafter_dir is None and model in KNOWN_MODELS:
            raise ValueError(f"drafter {base}: not fetched yet (cli.py fetch {model})")
        if drafter_dir is None:
            raise ValueError(f"drafter {base}: neither a model directory nor one of {sorted(KNOWN_MODELS)}")
        drafter: DrafterConfig | TransformerConfig = load_config(drafter_dir)
        name = base
    elif (checkpoint := drafter_checkpoint(base)) is not None:
        if not (checkpoint / "config.json").is_file():
            raise ValueError(f"drafter {base}: {checkpoint} holds no trained drafter (no config.json)")
        drafter = DrafterConfig.from_json((checkpoint / "config.json").read_text())
        name = f"{base} (trained for {drafter.target or 'an unnamed target'})"
    else:
        raise ValueError(f"unknown drafter {setting!r}: expected {DRAFTER_SETTINGS}")
    check_drafter_fits(name, drafter, model_name(model_dir) or str(model_dir), load_config(model_dir))
    return base, lookup_first


def drafter_checkpoint(drafter: str) -> Path | None:
    """The directory of a server's ``checkpoint:<dir>`` drafter setting (relative to the project; a
    ``+prompt_lookup`` after it names the same checkpoint), else None."""
    drafter = split_lookup_first(drafter)[0]
    return PROJECT_ROOT / drafter[len("checkpoint:"):] if drafter.startswith("checkpoint:") else None


def _drafter_graphs(drafter: str, model_dir: Path, dtype: str) -> Path | None:
    """The exported graphs of a server's trained block drafter beside a ``dtype`` target (from or into
    the cache), else None."""
    checkpoint = drafter_checkpoint(drafter)
    if checkpoint is None:
        return None
    module = load_drafter(checkpoint, load_transformer(model_dir, torch.float32))
    return cached_drafter_export(module, checkpoint, drafter_dtype(dtype)) if isinstance(module, BlockDrafter) else None


def drafter_tap_layers(drafter: str) -> tuple[int, ...]:
    """The target layers a server's drafter setting reads (none but for a trained checkpoint)."""
    directory = drafter_checkpoint(drafter)
    if directory is None:
        return ()
    return DrafterConfig.from_json((directory / "config.json").read_text()).tap_layers


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on the same filesystem (exports are hundreds of MB), else copy."""
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
