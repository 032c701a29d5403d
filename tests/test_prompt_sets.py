"""Prompt sets named on the command line: shipped sets, files, and clear errors for anything else."""
from __future__ import annotations

import json

import pytest

from benchmarks.prompt_sets import load_prompt_set


def test_shipped_set_and_file_give_their_prompts(tmp_path) -> None:
    assert len(load_prompt_set("code")) == 6
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_prompt_set(str(path)) == ["a", "b"]


def test_unknown_or_empty_sets_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="neither a file"):
        load_prompt_set("no-such-set")
    with pytest.raises(ValueError, match="unknown domain"):
        load_prompt_set("heldout:poetry:4")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_set(str(tmp_path / "empty.jsonl"))
    for count in ("0", "-1", "x"):
        with pytest.raises(ValueError, match="a whole number >= 1"):
            load_prompt_set(f"heldout:{count}")
    (tmp_path / "wrong.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="wrong.jsonl:2 has no string 'prompt' field"):
        load_prompt_set(str(tmp_path / "wrong.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="broken.jsonl:1 is not JSON"):
        load_prompt_set(str(tmp_path / "broken.jsonl"))


def test_a_path_reads_the_file_it_names_never_a_sibling_or_a_shipped_set(tmp_path) -> None:
    (tmp_path / "set").write_text(json.dumps({"prompt": "named"}) + "\n")
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "sibling"}) + "\n")
    assert load_prompt_set(str(tmp_path / "set")) == ["named"]
    with pytest.raises(ValueError, match="is a directory"):
        load_prompt_set(str(tmp_path))


def test_a_model_directory_gets_its_own_cache_name_under_the_cache() -> None:
    """Data and drafters of a target given as a path live under the cache, not in the model's folder."""
    from hub.fetch import cache_name

    assert cache_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    name = cache_name("/models/my-model")
    assert name.startswith("my-model-") and "/" not in name
    assert name != cache_name("/elsewhere/my-model")
