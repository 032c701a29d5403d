"""`cli.py export --drafter` and `cli.py bench steps` as a user runs them (SmolLM2, click's runner)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

import cli
from export.onnx_export import read_metadata
from export.repository import drafter_tap_layers
from hub.fetch import default_drafter


def test_export_writes_the_target_with_the_drafters_taps_and_the_drafter(tmp_path, smollm2_dir: Path) -> None:
    result = CliRunner().invoke(cli.cli, ["export", "--out", str(tmp_path), "--drafter", "auto", "--tap-layers", "3"])
    assert result.exit_code == 0, result.output
    taps = set(read_metadata(tmp_path / "model.onnx")["tap_layers"])
    assert taps == {3} | set(drafter_tap_layers(default_drafter(smollm2_dir)))
    assert {p.name for p in (tmp_path / "drafter").glob("*.onnx")} == {
        "context.onnx", "block.onnx", "markov.onnx", "confidence.onnx"}
    assert f"drafter onnx (float32): {tmp_path / 'drafter'}" in result.output


def test_export_refuses_a_directory_that_is_not_a_drafter(tmp_path, smollm2_dir: Path) -> None:
    result = CliRunner().invoke(cli.cli, ["export", "--out", str(tmp_path / "out"), "--drafter", str(tmp_path)])
    assert result.exit_code != 0
    assert "is not a drafter checkpoint" in result.output and "default drafter is checkpoint:" in result.output
    assert not (tmp_path / "out").exists()


def test_bench_steps_times_every_phase_on_each_runtime(tmp_path, smollm2_dir: Path) -> None:
    out = tmp_path / "steps.json"
    result = CliRunner().invoke(cli.cli, ["bench", "steps", "--context", "20,40", "--batch", "2", "--repeats", "1",
                                          "--threads", "1", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["runtimes"][1] == "onnxruntime/float32"
    assert [(r["context"], r["phase"]) for r in data["rows"]] == [
        (c, p) for c in (20, 40) for p in ("prefill", "decode", "verify", "extend", "draft")]
    assert all(r[label] > 0 for r in data["rows"] for label in data["runtimes"])


def test_bench_steps_refuses_a_drafter_that_is_not_a_checkpoint(tmp_path, smollm2_dir: Path) -> None:
    result = CliRunner().invoke(cli.cli, ["bench", "steps", "--drafter", "prompt_lookup", "--context", "20"])
    assert result.exit_code != 0 and "prompt_lookup is not a trained drafter checkpoint" in result.output


def test_user_mistakes_end_with_a_message_not_a_traceback(tmp_path, smollm2_dir: Path) -> None:
    """An unknown model name, and a `build --out` over a directory build did not write (left untouched)."""
    for args in (["fetch", "nosuch"], ["export", "--model", "nosuch"], ["build", "--model", "nosuch"]):
        result = CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), args
        assert "Error: unknown model 'nosuch'" in result.output, args
    result = CliRunner().invoke(cli.cli, ["generate", "--protocol", "http", "--url", "localhost:1", "hi"])
    assert result.exit_code == 1 and "no HTTP answer from a Triton server at localhost:1" in result.output
    half = tmp_path / "half"  # a model directory with its config alone: named, not a Triton log dump
    half.mkdir()
    (half / "config.json").write_text("{}")
    for args in (["fetch", str(half)], ["serve", "--model", str(half), "--http-port", "1"]):
        result = CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 1 and "has no tokenizer.json and no *.safetensors weights" in result.output, args
    # a dtype the repository's runtime cannot run: refused before a repository is written or Triton starts
    result = CliRunner().invoke(cli.cli, ["build", "--runtime", "onnxruntime", "--dtype", "bfloat16",
                                          "--out", str(tmp_path / "ort")])
    assert result.exit_code == 1 and "the onnxruntime runtime runs float32, int8 or w8a8, not bfloat16" in result.output
    assert not (tmp_path / "ort").exists()
    repo = tmp_path / "ort_repo"
    (repo / "dspark").mkdir(parents=True)
    (repo / "dspark" / "config.pbtxt").write_text('parameters { key: "runtime" value: { string_value: "onnxruntime" } }\n')
    result = CliRunner().invoke(cli.cli, ["serve", "--model-repository", str(repo), "--dtype", "bfloat16",
                                          "--http-port", "1"])
    assert result.exit_code == 1 and "--dtype: the onnxruntime runtime runs float32" in result.output, result.output
    for backend, url, protocol in (("tensorrtllm", "localhost:1", "gRPC"), ("generate", "localhost:1", "HTTP"),
                                   ("generate", "http://localhost:1", "HTTP")):  # before genai-perf's own traceback
        result = CliRunner().invoke(cli.cli, ["genai-perf", "--backend", backend, "--url", url])
        assert result.exit_code == 1 and f"no Triton server answers {protocol} at {url} (" in result.output
    result = CliRunner().invoke(cli.cli, ["status", "--url", "http://localhost:1"])
    assert result.exit_code == 1 and "server not reachable at http://localhost:1" in result.output
    for _ in range(5):  # the stream fails either in the call or in its callback: a race, tried a few times
        result = CliRunner().invoke(cli.cli, ["generate", "--url", "localhost:1", "hi"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "Error: no gRPC answer from a Triton server at localhost:1" in result.output, result.output
    for args, message in ((["serve", "--http-port", "70000"], "70000 is not in the range"),
                          (["serve", "--openai-port", "70000"], "70000 is not in the range"),
                          (["loadtest", "--start-server", "--openai-port", "0"], "0 is not in the range"),
                          (["profile", "--threads", "0"], "expected comma-separated whole numbers >= 1"),
                          (["profile", "--contexts", "100000"], "whole numbers 1..8192"),
                          (["bench", "decode", "--new-tokens", "0"], "0 is not in the range x>=1"),
                          (["bench", "decode", "--json-out", "/proc/nope/x.json"], "cannot create /proc/nope")):
        result = CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 2 and message in result.output, args
    # refused before Triton starts, not in its log after the model fails to load
    result = CliRunner().invoke(cli.cli, ["serve", "--detach", "--drafter", "garbage", "--http-port", "1"])
    assert result.exit_code == 1 and "--drafter: unknown drafter 'garbage'" in result.output
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli.cli, ["build", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "refusing to replace" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bench_mistakes_end_with_a_message_before_the_long_work(tmp_path, smollm2_dir: Path) -> None:
    """Every bench subcommand refuses bad values with the option's name (exit 2) or a one-line error
    (exit 1), never a traceback; a run shorter than the warm-up works."""
    shipped = str(cli.PROJECT_ROOT / "models" / "checkpoints" / "smollm2-135m-instruct-dspark")
    (tmp_path / "file").write_text("x")
    cases = [
        (["decode", "--config", "checkpoint=/nonexistent:3"], 2, "/nonexistent is not a drafter checkpoint"),
        (["decode", "--config", f"checkpoint={shipped}"], 2, "expected a draft length after ':'"),
        (["decode", "--config", "prompt_lookup:100"], 2, "must be a number in 1..16"),
        (["decode", "--config", f"checkpoint={shipped}:dspark=20"], 2, "MAX in dspark=MAX must be a number in 1..16"),
        (["acceptance", "--drafter", shipped, "--prompt-lookup", "a"], 2, "--prompt-lookup"),
        (["acceptance", "--drafter", shipped, "--out-dir", str(tmp_path / "file")], 2, "is a file"),
        (["acceptance", "--drafter", shipped, "--out-dir", str(tmp_path / "file" / "sub")], 2, "cannot create"),
        (["acceptance", "--drafter", shipped, "--prompts-per-domain", "0"], 2, "0 is not in the range x>=1"),
        (["acceptance", "--drafter", shipped, "--block", "50"], 2, "50 is more than"),
        (["acceptance", "--drafter", str(tmp_path / "file")], 2, "is a file"),
        (["acceptance", "--drafter", str(tmp_path)], 2, "holds no saved drafter"),
        (["acceptance", "--drafter", shipped, "--temperature", "-1"], 2, "-1.0 is not in the range x>=0"),
        (["steps", "--context", "a"], 2, "expected comma-separated whole numbers 1..8192"),
        (["steps", "--context", "0"], 2, "expected comma-separated whole numbers 1..8192"),
        (["steps", "--batch", "0"], 2, "0 is not in the range x>=1"),
        (["steps", "--verify-tokens", "0"], 2, "0 is not in the range x>=1"),
        (["steps", "--runtime", "bogus"], 2, "expected RUNTIME[/DTYPE]"),
        (["steps", "--runtime", "torch/float64"], 2, "expected RUNTIME[/DTYPE]"),
        (["runtimes", "--runtime", "torch", "--runtime", "torch"], 2, "give each runtime once"),
        (["runtimes", "--runtime", "tensorrt", "--new-tokens", "1"], 1, "needs the TensorRT Python package"),
    ]
    for args, code, message in cases:
        result = CliRunner().invoke(cli.cli, ["bench", *args])
        assert result.exit_code == code and message in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
    result = CliRunner().invoke(cli.cli, ["profile", "--dtype", "float32", "--threads", "1", "--tokens", "4",
                                          "--contexts", "16", "--repeats", "1", "--no-save"])
    assert result.exit_code == 0 and re.search(r"N=1 ms .* N=4 +\(cost / cost at N=1\)", result.output), result.output
    result = CliRunner().invoke(cli.cli, ["bench", "decode", "--new-tokens", "3", "--prompts", "code",
                                          "--config", "prompt_lookup:2", "--threads", "1"])
    assert result.exit_code == 0 and "prompt_lookup:2" in result.output, result.output


def test_export_out_replaces_only_an_export_of_its_own(tmp_path, smollm2_dir: Path) -> None:
    """`export --out` over a user's directory (even one holding a model.onnx and a raw/ folder) refuses
    and leaves it as it was; over its own earlier export it writes a fresh one."""
    mine = tmp_path / "mine"
    (mine / "raw").mkdir(parents=True)
    (mine / "raw" / "important.txt").write_text("precious")
    (mine / "model.onnx").write_text("my own graph")
    result = CliRunner().invoke(cli.cli, ["export", "--out", str(mine)])
    assert result.exit_code == 1 and "refusing to replace" in result.output, result.output
    assert (mine / "raw" / "important.txt").read_text() == "precious"
    assert (mine / "model.onnx").read_text() == "my own graph"

    (mine / "export.json").write_text("{}")  # a file of the export's name alone does not make it ours
    result = CliRunner().invoke(cli.cli, ["export", "--out", str(mine)])
    assert result.exit_code == 1 and "refusing to replace" in result.output, result.output

    out = tmp_path / "out"
    (tmp_path / ".out.building-999999999").mkdir()  # a killed export's leftover
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    for target in (out, tmp_path / "link"):  # the second run replaces the first run's export, through a link
        result = CliRunner().invoke(cli.cli, ["export", "--out", str(target), "--drafter", "auto"])
        assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "export.json", ".dspark-export", "drafter"}
    assert (out / "drafter" / "drafter_export.json").is_file() and (tmp_path / "link").is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no half-written directory left behind"


def test_a_drafter_for_another_target_is_refused_before_anything_is_written(tmp_path, smollm2_dir: Path) -> None:
    """export (and every other command that loads a drafter) names the mismatch instead of failing deep in
    the drafter's first forward, and writes nothing."""
    qwen_drafter = cli.PROJECT_ROOT / "models" / "checkpoints" / "qwen2.5-coder-1.5b-instruct-dspark"
    result = CliRunner().invoke(cli.cli, ["export", "--out", str(tmp_path / "out"), "--drafter", str(qwen_drafter)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "trained for qwen2.5-coder-1.5b-instruct) does not fit this target: vocabulary 151936 vs 49152" in result.output
    assert not (tmp_path / "out").exists()
