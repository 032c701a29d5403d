"""End-to-end `cli.py train`: load the target, build or reuse the cached data, train, calibrate, save."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from hub.fetch import cache_dir, cache_name, fetch_model
from models.drafters import DRAFT_VOCAB_FILE, DrafterConfig, default_config, load_drafter, save_drafter
from models.loading import load_transformer
from orchestrator.errors import InvalidRequestError
from orchestrator.prompting import PromptEncoder
from training.data import AnswerSpec, Sequence, build_dataset, generated_prompts
from training.layer_init import check_layers_fit, qk_norm_gains, widened_markov
from training.sources import Prompt, build_prompts
from training.train import (RUN_MARKER, STATE_FILE, TrainConfig, calibrate_confidence, make_batch, run_record,
                            saved_run, train_drafter, usable)
from training.vocab import coverage, draft_vocabulary

DATA_VERSION = 4  # bump when what a shard holds changes
# The target answers in bf16: 2.3x faster than fp32 on this CPU; greedy answers differ only at near-ties.
GENERATION_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class SplitData:
    """One split's prompts, built from the sources (``per_source``) or read from a file written by
    ``cli.py prompts`` (``prompts_file``: how a host without the source packages gets the same
    prompts), and how the target answers them."""

    split: str
    answers: AnswerSpec
    per_source: tuple[tuple[str, int | tuple[int, int]], ...] = ()
    prompts_file: Path | None = None

    @functools.cached_property
    def prompts(self) -> list[Prompt]:
        """Built once per SplitData: the sources walk the standard library and package files."""
        if self.prompts_file is not None:
            return [Prompt(**p) for p in json.loads(Path(self.prompts_file).read_text())]
        return build_prompts(self.split, dict(self.per_source))


def data_dir(target_name: str, data: SplitData, tap_layers: tuple[int, ...]) -> Path:
    """Where a split's shards live: named by everything that shapes them."""
    prompts = hashlib.sha256(json.dumps([p.__dict__ for p in data.prompts]).encode()).hexdigest()
    a = data.answers
    key = json.dumps([DATA_VERSION, target_name, prompts, list(tap_layers), a.max_new_tokens, list(a.temperatures),
                      a.batch_size, a.seed])
    return cache_dir() / "drafter-data" / cache_name(target_name) / f"{data.split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def dataset(target_name: str, data: SplitData, tap_layers: tuple[int, ...], device: str = "cpu",
            progress: bool = True, generate: bool = True, wait: bool = True) -> list[Sequence]:
    """Target-answered sequences of a split, cached (and resumed) under the cache dir by everything
    that shapes them; ``generate`` False takes the shards generated so far, ``wait`` False does not wait
    for shards other workers hold (``build_dataset``). The target answers on ``device``."""
    model_dir = fetch_model(target_name)
    directory = data_dir(target_name, data, tap_layers)
    prompts = data.prompts
    if (directory / "complete").exists() or not generate:
        return build_dataset(directory, None, None, prompts, tap_layers, data.answers, progress=progress,
                             generate=False)
    target = load_transformer(model_dir, GENERATION_DTYPE).to(device)
    encoder = PromptEncoder.from_model_dir(model_dir, max_prompt_tokens=4096)
    for i, prompt in enumerate(prompts):  # all of them before any is answered
        try:
            encoder.encode(prompt.text, True)
        except InvalidRequestError as exc:
            raise TrainSetupError(f"prompt {i + 1} of the {data.split} set ({prompt.source}): {exc}") from None
    seqs = build_dataset(directory, target, lambda text: encoder.encode(text, True), prompts, tap_layers,
                         data.answers, progress=progress, wait=wait)
    # complete when every shard is there, which a wait=False pass may already see: no target load for it again
    if len(seqs) == len(prompts) * len(data.answers.temperatures):
        (directory / "complete").write_text(json.dumps(source_counts(prompts)) + "\n")
    return seqs


def source_counts(prompts: list[Prompt]) -> dict[str, int]:
    """How many prompts each source gave."""
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.source] = counts.get(p.source, 0) + 1
    return counts


class TrainSetupError(ValueError):
    """A run that cannot start as asked (found before any data loads): the user's to fix, not a bug."""


def saved_drafter_config(directory: Path, option: str) -> DrafterConfig:
    """The configuration of a drafter saved in ``directory``; TrainSetupError naming ``option`` otherwise."""
    try:
        return DrafterConfig.from_json((Path(directory) / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        raise TrainSetupError(f"{option} {directory} holds no saved drafter (its config.json is missing or is "
                              "not a drafter's)") from None


def run_training(kind: str, target_name: str, out_dir: Path, cfg: TrainConfig, train_data: list[SplitData],
                 calib_data: SplitData, export_dtype: torch.dtype | None = None, draft_vocab_size: int = 0,
                 num_layers: int = 2, intermediate_size: int = 1024, markov_rank: int | None = 32, block_size: int = 7,
                 generate: bool = True, init_dir: Path | None = None, rope: str = "standard",
                 layers_from_target: bool = False, qk_norm: bool | None = None) -> dict:
    """Train one drafter kind on the shared dataset, inside a draft vocabulary of the target's
    ``draft_vocab_size`` most frequent answer tokens (0 = the full vocabulary); DSpark also gets its
    confidences calibrated (STS, per regime). The calib split gives the held-out figures. The training
    data is the union of ``train_data``'s sets (each prompt mix answered its own way, cached on its
    own, so a mix added later reuses the shards of the earlier ones). With ``generate`` False the
    training sets are the shards generated so far; a resumed run keeps the
    draft vocabulary it started with. Missing data is generated on ``cfg.device``. With ``init_dir``
    (a saved drafter, say one trained on a GPU host) the run starts from its weights, configuration
    and draft vocabulary, and ``rope`` is unused; ``qk_norm`` True adds q/k norms to a drafter saved
    without them, their gains fitted so that it starts close to where it was, and a ``markov_rank`` above
    its own widens its Markov head (``training.layer_init.widened_markov``; None keeps it, 32 without ``init_dir``); without it,
    ``layers_from_target`` starts the layers from the target's top layers (``training.layer_init``).
    ``qk_norm`` None: on, except for layers taken from a target without q/k norms."""
    # Training reads only the target's embeddings, LM head, norms and (optionally) top layers, in bf16 as
    # the data was generated: a float32 copy of a 1.5B target is 6 GB that a second run or a data worker
    # beside it lacks.
    out_dir = Path(out_dir)
    # the state is saved before the weights: a marker beside weights without a state is a copy of a finished run
    ours = (out_dir / STATE_FILE).exists() or ((out_dir / RUN_MARKER).exists()
                                               and not (out_dir / "model.safetensors").exists())
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not ours)):
        raise TrainSetupError(f"--out {out_dir} is not a new or empty directory, nor a run to resume (no {STATE_FILE}): "
                              "a run would overwrite what is there (a shipped drafter keeps no training state)")
    target = load_transformer(fetch_model(target_name), GENERATION_DTYPE)
    if init_dir is not None and layers_from_target:
        raise TrainSetupError("a run starts from --init's weights or from the target's layers, not both")
    init_config = None
    if init_dir is not None:
        config = init_config = saved_drafter_config(init_dir, "--init")
        if config.kind != kind or config.target != target_name:
            raise TrainSetupError(f"{init_dir} holds a {config.kind} drafter for {config.target!r}, not {kind} for {target_name!r}")
        if qk_norm is False and config.qk_norm:
            raise TrainSetupError(f"{init_dir} holds a drafter with q/k norms: they cannot be taken out")
        if qk_norm and not config.qk_norm:
            config = replace(config, qk_norm=True)
        if markov_rank is not None and markov_rank != config.markov_rank and kind == "dspark":
            if markov_rank < config.markov_rank:
                raise TrainSetupError(f"--init {init_dir}: its Markov head of rank {config.markov_rank} cannot be "
                                      f"narrowed to {markov_rank}")
            config = replace(config, markov_rank=markov_rank)
    else:
        config = default_config(kind, target, target_name, block_size=block_size, num_layers=num_layers,
                                 intermediate_size=intermediate_size, markov_rank=32 if markov_rank is None else markov_rank,
                                 draft_vocab_size=draft_vocab_size, rope=rope,
                                 qk_norm=not layers_from_target if qk_norm is None else qk_norm)
        if layers_from_target:  # checked before any data loads
            try:
                check_layers_fit(config, target.config)
            except ValueError as exc:
                raise TrainSetupError(f"--layers-from-target: {exc}") from None
            config = replace(config, extra={**config.extra, "layers_from_target": True})
    saved = saved_run(out_dir)
    run = run_record(cfg, [data_dir(target_name, data, config.tap_layers).name for data in train_data])
    if saved is not None:  # checked before any data is generated
        _check_resume(out_dir, saved, config, run)
    calib = dataset(target_name, calib_data, config.tap_layers, cfg.device)
    parts = [dataset(target_name, data, config.tap_layers, cfg.device, generate=generate) for data in train_data]
    train = [seq for part in parts for seq in part]
    if not train:
        raise TrainSetupError("no training answers: the --train-prompts give no prompts (or, with --no-generate, none "
                              "were answered yet)")
    _check_blocks(train, config.block_size, "training")
    _check_blocks(calib, config.block_size, "calib")
    vocab = None
    if saved is not None and saved["draft_vocab"] is not None:
        vocab = saved["draft_vocab"]
    elif config.draft_vocab_size:
        source = out_dir if saved is not None else init_dir and Path(init_dir)  # a run saved before vocabularies lived in its state
        vocab = (load_file(str(source / DRAFT_VOCAB_FILE))["token_ids"] if source is not None
                 else draft_vocabulary(train, config.vocab_size, config.draft_vocab_size))
    init = load_file(str(Path(init_dir) / "model.safetensors")) if init_dir is not None else None
    if init is not None and config.qk_norm and not init_config.qk_norm and saved is None:
        init = {**init, **_fitted_qk_norms(target, Path(init_dir), train, cfg)}
    if init is not None and config.markov_rank != init_config.markov_rank:
        init = widened_markov(init, config.markov_rank)
    result = train_drafter(target, config, train, out_dir, cfg, draft_vocab=vocab, heldout=calib, init=init,
                           layers_from_target=layers_from_target, run=run)
    if init_dir is not None:
        result["initialised_from"] = Path(init_dir).name
    drafter = result.pop("drafter")
    result["data"] = {"train": [data_summary(target_name, data, config.tap_layers, part)
                                for data, part in zip(train_data, parts)],
                      "calib": data_summary(target_name, calib_data, config.tap_layers, calib)}
    if vocab is not None:
        result["draft_vocab"] = {"size": int(vocab.numel()), "calib_coverage": coverage(vocab, calib, config.vocab_size)}
    if config.confidence:
        result["calibration"] = calibrate_confidence(drafter, calib, out_dir, cfg)
    save_drafter(drafter, out_dir, dtype=export_dtype)
    (out_dir / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _check_blocks(seqs: list[Sequence], block: int, split: str) -> None:
    """TrainSetupError when no answer of a split is long enough to train or calibrate a block on."""
    if not usable(seqs, block):
        raise TrainSetupError(f"no {split} answer holds a whole block ({block + 1} answer tokens): "
                              "raise --max-new-tokens or choose other prompts")


def _check_resume(out_dir: Path, saved: dict, config, run: dict) -> None:
    """TrainSetupError unless this command continues the run saved in ``out_dir``: the same drafter
    configuration, schedule options and data (a resume with others would silently mix two runs)."""
    if saved["config"] != config.to_json():
        old, new = json.loads(saved["config"]), json.loads(config.to_json())
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise TrainSetupError(f"--out {out_dir} holds a run of another drafter ({old.get('kind')} for "
                              f"{old.get('target')!r}; differs in {', '.join(changed)}): resume it with its own "
                              "options, or choose another --out")
    if saved["run"] is None:  # saved before runs kept their record
        return
    then = saved["run"]
    changed = [k for k in run["train"] if k in then["train"] and then["train"][k] != run["train"][k]]
    details = "; ".join(f"{k}: {then['train'][k]} then, {run['train'][k]} now" for k in changed)
    if then.get("data") != run["data"]:  # named by content (data_dir): the same prompts and answers, wherever read
        changed.append("training prompts or answers")
    if changed:
        raise TrainSetupError(f"--out {out_dir} holds a run with other {', '.join(changed)}"
                              f"{' (' + details + ')' if details else ''}: resume it with its own options, "
                              "or choose another --out")


def _fitted_qk_norms(target, init_dir: Path, train: list[Sequence], cfg: TrainConfig,
                     batches: int = 8) -> dict[str, torch.Tensor]:
    """q/k norm gains for the drafter saved in ``init_dir`` without them
    (``training.layer_init.qk_norm_gains``), fitted on its training forward over the first
    ``batches`` batches of the training data, in float32 as training runs."""
    plain = load_drafter(init_dir, target)
    plain.use_kernel_plan(None)
    plain.float()
    plain.embed, plain.lm_head = plain.embed.float(), plain.lm_head.float()
    block = plain.config.block_size
    gen = torch.Generator().manual_seed(cfg.seed)
    seqs = usable(train, block)
    fit = [make_batch(seqs[i:i + cfg.batch_size], cfg, block, gen)
           for i in range(0, min(len(seqs), batches * cfg.batch_size), cfg.batch_size)]
    return qk_norm_gains(plain, fit)


def recalibrate(drafter_dir: Path, calib_data: SplitData, cfg: TrainConfig | None = None) -> dict:
    """Refit a saved DSpark drafter's confidence calibration on the calib split, in place: its weights
    are untouched (and stored back in the dtype they had), train_result.json gets the new figures."""
    drafter_dir = Path(drafter_dir)
    config = saved_drafter_config(drafter_dir, "--drafter")
    if not config.confidence:
        raise TrainSetupError(f"{drafter_dir} holds a {config.kind} drafter: it has no confidence head to calibrate")
    target = load_transformer(fetch_model(config.target))
    drafter = load_drafter(drafter_dir, target)
    stored = load_file(str(drafter_dir / "model.safetensors"))
    dtype = next(v.dtype for v in stored.values() if v.is_floating_point())
    calib = dataset(config.target, calib_data, config.tap_layers)
    _check_blocks(calib, config.block_size, "calib")
    result = calibrate_confidence(drafter, calib, drafter_dir, cfg or TrainConfig())
    save_drafter(drafter, drafter_dir, dtype=dtype)
    summary = drafter_dir / "train_result.json"
    if summary.exists():
        record = json.loads(summary.read_text())
        record["calibration"] = result
        summary.write_text(json.dumps(record, indent=2) + "\n")
    return result


def data_summary(target_name: str, data: SplitData, tap_layers: tuple[int, ...], seqs: list[Sequence]) -> dict:
    """Prompts per source (of the shards used, once per answer), answers per prompt and their
    temperatures, sequences and answer tokens of a split."""
    used = generated_prompts(data_dir(target_name, data, tap_layers), data.prompts, data.answers)
    return {"prompts_per_source": source_counts(used), "answer_temperatures": list(data.answers.temperatures),
            "max_new_tokens": data.answers.max_new_tokens, "sequences": len(seqs),
            "answer_tokens": sum(len(s.tokens) - s.prompt_len for s in seqs)}
