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
