"""genai-perf, NVIDIA's LLM benchmark over perf_analyzer, run unchanged against our `ensemble`.

genai-perf 0.0.16 wants numpy<2 and its own transformers, so it gets a virtual environment of its own
under the cache, made from the package registry on first use. Its `perf-analyzer` dependency is a
placeholder on this glibc; the binary genai-perf starts is the tritonclient 2.51 wheel's
`bin/perf_analyzer` in that environment, with the libraries `clients.perf_analyzer` links on
LD_LIBRARY_PATH. Both Triton conventions genai-perf knows are served: `--backend tensorrtllm`
(text_input, max_tokens, min_length, exclude_input_in_output) and `--backend vllm`
(sampling_parameters JSON).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from clients.loadgen import check_loopback
from clients.perf_analyzer import PerfAnalyzerUnavailable, check_runs, perf_analyzer_env, prepare_libraries
from hub.fetch import _locked, cache_dir

GENAI_PERF_VERSION = "0.0.16"
REQUIREMENTS = (f"genai-perf=={GENAI_PERF_VERSION}", "numpy<2", "tritonclient[grpc,http]==2.51.0")
BACKENDS = ("tensorrtllm", "vllm")  # the Triton conventions of `--endpoint-type kserve`


def ensure_genai_perf(root: Path | None = None) -> Path:
    """The environment's bin directory (genai-perf and perf_analyzer), installing it once."""
    venv = (root or cache_dir() / "genai-perf") / f"venv-{GENAI_PERF_VERSION}"
    done = venv / ".installed"
    with _locked(venv.parent / ".install.lock"):
        if not done.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
                           check=True)
            done.touch()
    return venv / "bin"


@dataclass
class GenaiPerfResult:
    command: list[str]
    stats: dict            # genai-perf's own summary (profile_export_genai_perf.json)
    our_output_tokens: list[int]  # per request, what the server counted (num_output_tokens of its last response)
    stdout: str

    @property
    def genai_perf_output_tokens(self) -> float:
        """genai-perf's mean output tokens per request (it re-tokenizes the streamed text)."""
        return float(self.stats["output_sequence_length"]["avg"])

    @property
    def our_mean_output_tokens(self) -> float:
        return sum(self.our_output_tokens) / len(self.our_output_tokens)


def build_command(genai_perf: Path, url: str, backend: str, tokenizer: Path, artifact_dir: Path, model: str = "ensemble",
                  input_tokens: int = 32, output_tokens: int = 16, num_prompts: int = 4, request_count: int = 4,
                  concurrency: int = 1) -> list[str]:
    """The documented `genai-perf profile` recipe, streaming, bounded by request count. `backend` is a
    kserve convention over gRPC, or "generate" for Triton's HTTP generate extension (its streaming
    route named explicitly: genai-perf 0.0.16 would call the one-response route)."""
    if backend in BACKENDS:  # each convention sends its own min-length input (min_length / min_tokens)
        endpoint = ["--endpoint-type", "kserve", "--backend", backend, "--output-tokens-mean-deterministic"]
    elif backend == "generate":  # no deterministic option there: min_length goes as an extra input
        endpoint = ["--endpoint-type", "generate", "--endpoint", f"v2/models/{model}/generate_stream",
                    "--extra-inputs", f"min_length:{output_tokens}"]
    else:
        raise ValueError(f"backend must be one of {BACKENDS} or 'generate', got {backend!r}")
    return [
        str(genai_perf), "profile", "-m", model, *endpoint, "-u", url, "--tokenizer", str(tokenizer), "--streaming",
        "--synthetic-input-tokens-mean", str(input_tokens), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(output_tokens),
        "--num-dataset-entries", str(num_prompts), "--request-count", str(request_count),
        "--warmup-request-count", "0", "--concurrency", str(concurrency), "--artifact-dir", str(artifact_dir),
    ]


def _response_counts(output: dict) -> list[int]:
    """num_output_tokens of one recorded response: a gRPC response's tensors, or HTTP server-sent events."""
    if "num_output_tokens" in output:
        value = output["num_output_tokens"]
        return [int(value[0] if isinstance(value, list) else value)]
    events = [line[len("data:"):] for line in str(output.get("response", "")).splitlines() if line.startswith("data:")]
    return [int(json.loads(e)["num_output_tokens"]) for e in events if "num_output_tokens" in e]


def our_output_tokens(profile_export: dict) -> list[int]:
    """Per request, the server's own num_output_tokens (its last response), from perf_analyzer's raw export."""
    counts = []
    for experiment in profile_export.get("experiments", []):
        for request in experiment.get("requests", []):
            seen = [n for output in request.get("response_outputs") or [] for n in _response_counts(output)]
            if seen:
                counts.append(seen[-1])
    return counts


def run_genai_perf(url: str, backend: str, tokenizer: Path, artifact_dir: Path, timeout_s: float = 600,
                   **options) -> GenaiPerfResult:
    """Run `genai-perf profile` in its own environment and read back its summary and perf_analyzer's export."""
    check_loopback(url)
    bin_dir = ensure_genai_perf()
    env = perf_analyzer_env(prepare_libraries())
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    check_runs(bin_dir / "perf_analyzer", env)
    shutil.rmtree(artifact_dir, ignore_errors=True)  # only this run's exports are read back
    artifact_dir.mkdir(parents=True)
    command = build_command(bin_dir / "genai-perf", url, backend, tokenizer, artifact_dir, **options)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=artifact_dir)
    summaries = sorted(artifact_dir.rglob("profile_export_genai_perf.json"))
    raw = sorted(artifact_dir.rglob("profile_export.json"))
    if proc.returncode != 0 or not summaries or not raw:
        raise RuntimeError(f"genai-perf failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return GenaiPerfResult(command, json.loads(summaries[-1].read_text()), our_output_tokens(json.loads(raw[-1].read_text())),
                           proc.stdout)

