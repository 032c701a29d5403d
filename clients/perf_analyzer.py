"""perf_analyzer against the streaming `dspark` model: the standard Triton tool as a cross-check of
`clients.loadgen`.

The tritonclient 2.51 wheel ships `bin/perf_analyzer`, linked against `libb64.so.0d` and
`libcudart.so.12`. Both exist in the nvidia-pytriton wheel, but only under auditwheel's hashed
names, so they are symlinked under their sonames into a cache directory put on LD_LIBRARY_PATH.
Every input we send has dims [1], so no `--shape` is needed; the prompts, sampling and policy go
in an `--input-data` JSON (one entry per prompt, used round robin).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.loadgen import Policy, check_loopback
from hub.fetch import cache_dir

SONAMES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerUnavailable(RuntimeError):
    """The binary or its libraries are missing, or it cannot start on this machine."""


def find_binary() -> Path:
    """perf_analyzer from the venv's bin (where tritonclient puts it), else from PATH."""
    path = Path(sys.executable).parent / "perf_analyzer"
    found = path if path.is_file() else (Path(p) if (p := shutil.which("perf_analyzer")) else None)
    if found is None:
        raise PerfAnalyzerUnavailable("perf_analyzer not found; install tritonclient[all]==2.51.0")
    return found


def prepare_libraries(lib_dir: Path | None = None) -> Path:
    """Symlink the libraries perf_analyzer needs under their sonames; returns the directory."""
    from serving.triton_launcher import _pytriton_libs

    lib_dir = lib_dir or cache_dir() / "perf_analyzer" / "lib"
    lib_dir.mkdir(parents=True, exist_ok=True)
    for soname, pattern in SONAMES.items():
        matches = sorted(_pytriton_libs().glob(pattern))
        if not matches:
            raise PerfAnalyzerUnavailable(f"{pattern} not found in {_pytriton_libs()}; is nvidia-pytriton installed?")
        link = lib_dir / soname
        if link.is_symlink() and link.resolve() == matches[0].resolve():
            continue
        tmp = lib_dir / f".{soname}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(matches[0].resolve())
        os.replace(tmp, link)  # atomic, so a concurrent run never sees the link missing
    return lib_dir


def perf_analyzer_env(lib_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH")]))
    return env


def check_runs(binary: Path, env: dict[str, str]) -> None:
    """Start the binary once (`--help`) so a missing library shows up as a clear error."""
    out = subprocess.run([str(binary), "--help"], env=env, capture_output=True, text=True, timeout=30)
    if "error while loading shared libraries" in out.stderr:
        raise PerfAnalyzerUnavailable(out.stderr.strip())


def write_input_data(path: Path, prompts: list[str], policy: Policy, max_tokens: int,
                     temperature: float = 0.0) -> Path:
    """perf_analyzer's --input-data JSON: one request per prompt with the policy's speculation inputs."""
    def entry(prompt: str) -> dict[str, Any]:
        item: dict[str, Any] = {"text_input": [prompt], "max_tokens": [max_tokens], "temperature": [temperature],
                                "stream": [True], "spec_mode": [policy.spec_mode]}
        if policy.num_draft_tokens is not None:
            item["num_draft_tokens"] = [policy.num_draft_tokens]
        return item

    path.write_text(json.dumps({"data": [entry(p) for p in prompts]}, indent=1))
    return path


def build_command(binary: Path, url: str, input_data: Path, concurrency_range: str, request_count: int,
                  csv_path: Path, profile_path: Path, model: str = "dspark", stability_percentage: int = 100,
                  max_trials: int = 5) -> list[str]:
    """The recipe. Count windows keep runs short; a wide stability band stops perf_analyzer from
    retrying forever on a machine where LLM latency varies with prompt and load."""
    return [
        str(binary), "-m", model, "--streaming", "-i", "grpc", "-u", url,
        "--input-data", str(input_data),
        "--measurement-mode", "count_windows", "--measurement-request-count", str(request_count),
        "--concurrency-range", concurrency_range,
        "--stability-percentage", str(stability_percentage), "--max-trials", str(max_trials),
        "-f", str(csv_path), "--profile-export-file", str(profile_path),
    ]


@dataclass
class PerfAnalyzerResult:
    command: list[str]
    rows: list[dict[str, Any]]     # per concurrency: perf_analyzer's CSV plus TTFT/e2e/tokens from the profile
    stdout: str


def summarize_profile(profile: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Per concurrency, from per-request response timestamps: TTFT and e2e p50 (s), tokens per request,
    and output tokens/s over the experiment's span."""
    summary: dict[int, dict[str, float]] = {}
    for exp in profile.get("experiments", []):
        reqs = [r for r in exp.get("requests", []) if r.get("response_timestamps")]
        if exp.get("experiment", {}).get("mode") != "concurrency" or not reqs:
            continue
        tokens = [sum(np.size(o.get("output_ids", [])) for o in r.get("response_outputs", [])) for r in reqs]
        ttft = [(r["response_timestamps"][0] - r["timestamp"]) / 1e9 for r in reqs]
        e2e = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e9 for r in reqs]
        span = (max(r["response_timestamps"][-1] for r in reqs) - min(r["timestamp"] for r in reqs)) / 1e9
        summary[int(exp["experiment"]["value"])] = {
            "requests": len(reqs), "ttft_p50": float(np.median(ttft)), "e2e_p50": float(np.median(e2e)),
            "tokens_per_request": float(np.mean(tokens)), "total_tps": sum(tokens) / span if span > 0 else 0.0,
        }
    return summary


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_perf_analyzer(url: str, prompts: list[str], policy: Policy, out_dir: Path, concurrency_range: str = "1:2",
                      request_count: int = 4, max_tokens: int = 32, timeout_s: float = 600) -> PerfAnalyzerResult:
    """Prepare libraries and input data, run perf_analyzer, parse its CSV and profile export."""
    check_loopback(url)
    binary = find_binary()
    env = perf_analyzer_env(prepare_libraries())
    check_runs(binary, env)
    out_dir.mkdir(parents=True, exist_ok=True)
    input_data = write_input_data(out_dir / "input_data.json", prompts, policy, max_tokens)
    csv_path, profile_path = out_dir / "perf_analyzer.csv", out_dir / "profile_export.json"
    csv_path.unlink(missing_ok=True)
    command = build_command(binary, url, input_data, concurrency_range, request_count, csv_path, profile_path)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not csv_path.is_file():
        raise RuntimeError(f"perf_analyzer failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    profile = summarize_profile(json.loads(profile_path.read_text())) if profile_path.is_file() else {}
    rows = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {k: _number(v) for k, v in row.items()}
            parsed.update(profile.get(int(parsed["Concurrency"]), {}))
            rows.append(parsed)
    return PerfAnalyzerResult(command, sorted(rows, key=lambda r: r["Concurrency"]), proc.stdout)
