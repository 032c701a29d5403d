"""Triton adapter for the generation engine; the loop lives in orchestrator.engine."""
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from export.onnx_export import compute_dtype
from export.repository import check_drafter_setting, check_graph_source, drafter_checkpoint, drafter_tap_layers
from hub.fetch import cache_dir, model_dir_if_cached
from models.hardware import resolve_dtype, usable_cores
from orchestrator.draft_vocab import cached_draft_vocab
from orchestrator.drafting import (
    DrafterMismatchError,
    FeatureDrafter,
    LookupFirstDrafter,
    ModelDrafter,
    PromptLookupDrafter,
)
from orchestrator.engine import SHUTDOWN_MESSAGE, Engine, EngineConfig, EngineStoppedError, GenerationChunk
from orchestrator.errors import InvalidRequestError
from orchestrator.policies import SpeculationParams
from orchestrator.prompting import PromptEncoder
from orchestrator.request_inputs import (
    check_one_prompt,
    parse_bool,
    parse_prompt_ids,
    parse_sampling_params,
    parse_speculation,
    refuse_parameters,
)
from orchestrator.step_cost import load_or_measure, profile_path
from runtimes.loading import load_feature_drafter, load_runner
from serving.load_monitor import LoadMonitor
from serving.stop_signal import on_sigterm

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("dspark")


def _response(token_ids, text, chunk: GenerationChunk):
    """Token ids and text (one chunk's, or a whole answer's) with the chunk's running counters."""
    counters = {
        "num_prompt_tokens": chunk.num_prompt_tokens,
        "num_output_tokens": chunk.num_output_tokens,
        "draft_rounds": chunk.num_draft_rounds,
        "draft_tokens": chunk.num_draft_tokens,
        "accepted_tokens": chunk.num_accepted_tokens,
    }
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.asarray(token_ids, dtype=np.int32)),
        pb_utils.Tensor("finish_reason", np.array([(chunk.finish_reason or "").encode()], dtype=np.object_)),
    ] + [pb_utils.Tensor(name, np.array([value], dtype=np.int32)) for name, value in counters.items()])


def _error(message, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class _ResponseStream:
    """Sends engine chunks to one client: each chunk when streaming, one response otherwise."""

    def __init__(self, sender, stream: bool):
        self.sender = sender
        self.stream = stream
        self.token_ids: list[int] = []
        self.text = ""

    def __call__(self, chunk: GenerationChunk) -> None:
        if chunk.error is not None:
            code = None
            if chunk.error == SHUTDOWN_MESSAGE:
                code = pb_utils.TritonError.UNAVAILABLE  # retry elsewhere or later
            elif chunk.finish_reason == "cancelled":
                code = pb_utils.TritonError.CANCELLED
            self.sender.send(_error(chunk.error, code), flags=FINAL)
            return
        if chunk.finish_reason == "cancelled":
            self.sender.send(_error("request cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
            return
        final = chunk.finish_reason is not None
        if self.stream:
            self.sender.send(_response(chunk.token_ids, chunk.text, chunk), flags=FINAL if final else 0)
            return
        self.token_ids += chunk.token_ids
        self.text += chunk.text
        if final:
            self.sender.send(_response(self.token_ids, self.text, chunk), flags=FINAL)


class _EngineMetrics:
    """Publishes the engine's counters as Triton custom metrics (the /metrics endpoint), twice a second."""

    PERIOD_S = 0.5
    REASONS = ("length", "stop", "cancelled", "error")

    def __init__(self, engine: Engine):
        self.engine = engine
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.families = {
            "active": pb_utils.MetricFamily("dspark_active_requests", "Requests holding a cache slot", gauge),
            "external": pb_utils.MetricFamily(
                "dspark_load_pending_requests", "Requests pending in Triton, as the scheduler last read them", gauge),
            "waiting": pb_utils.MetricFamily("dspark_waiting_requests", "Requests waiting for a slot", gauge),
            "tokens": pb_utils.MetricFamily("dspark_generated_tokens_total", "Tokens streamed to clients", counter),
            "steps": pb_utils.MetricFamily("dspark_engine_steps_total", "Batched target forwards", counter),
            "finished": pb_utils.MetricFamily("dspark_finished_requests_total", "Finished requests by reason", counter),
            "rounds": pb_utils.MetricFamily("dspark_draft_rounds_total", "Verification rounds with drafts", counter),
            "drafted": pb_utils.MetricFamily(
                "dspark_draft_tokens_total", "Draft tokens verified, by draft position", counter),
            "accepted": pb_utils.MetricFamily(
                "dspark_accepted_tokens_total", "Draft tokens accepted, by draft position", counter),
            "plan_tokens": pb_utils.MetricFamily(
                "dspark_step_tokens", "Tokens in the last target forward, prompt prefills included", gauge),
            "plan_drafts": pb_utils.MetricFamily(
                "dspark_step_draft_tokens", "Draft tokens the last step verified", gauge),
            "cost_ratio": pb_utils.MetricFamily(
                "dspark_step_cost_ratio", "Measured / predicted target step time (online correction of the step-cost profile)", gauge),
        }
        self.active = self.families["active"].Metric(labels={})
        self.external = self.families["external"].Metric(labels={})
        self.waiting = self.families["waiting"].Metric(labels={})
        self.tokens = self.families["tokens"].Metric(labels={})
        self.steps = self.families["steps"].Metric(labels={})
        self.finished = {r: self.families["finished"].Metric(labels={"reason": r}) for r in self.REASONS}
        self.rounds = self.families["rounds"].Metric(labels={})
        self.plan_tokens = self.families["plan_tokens"].Metric(labels={})
        self.plan_drafts = self.families["plan_drafts"].Metric(labels={})
        self.cost_ratio = self.families["cost_ratio"].Metric(labels={})
        positions = range(len(engine.stats.speculation.drafted_at))
        self.drafted = [self.families["drafted"].Metric(labels={"position": str(k + 1)}) for k in positions]
        self.accepted = [self.families["accepted"].Metric(labels={"position": str(k + 1)}) for k in positions]
        self._published: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dspark-metrics", daemon=True)
        self._thread.start()

    def _add(self, key, metric, total):
        metric.increment(total - self._published.get(key, 0))
        self._published[key] = total

    def _run(self):
        while not self._stop.wait(self.PERIOD_S):
            stats = self.engine.stats
            self.active.set(self.engine.num_active)
            self.external.set(self.engine.external_waiting)
            self.waiting.set(self.engine.num_waiting)
            self.plan_tokens.set(stats.last_step_tokens)
            self.plan_drafts.set(stats.last_step_draft_tokens)
            if self.engine.step_cost is not None:
                self.cost_ratio.set(self.engine.step_cost.ratio)
            self._add("tokens", self.tokens, stats.tokens_generated)
            self._add("steps", self.steps, stats.steps)
            for reason, metric in self.finished.items():
                self._add(reason, metric, stats.finished.get(reason, 0))
            spec = stats.speculation
            self._add("rounds", self.rounds, spec.rounds)
            for k, (drafted, accepted) in enumerate(zip(self.drafted, self.accepted)):
                self._add(f"drafted{k}", drafted, spec.drafted_at[k])
                self._add(f"accepted{k}", accepted, spec.accepted_at[k])

    def close(self):
        """Metrics must be deleted before their families, or the stub crashes at shutdown."""
        self._stop.set()
        self._thread.join()
        del self.active, self.external, self.waiting, self.tokens, self.steps, self.finished, self.rounds, self.drafted, self.accepted
        del self.plan_tokens, self.plan_drafts, self.cost_ratio
        self.families.clear()


def _resolve_model_dir(name: str) -> Path:
    model_dir = model_dir_if_cached(name)
    if model_dir is None:
        raise pb_utils.TritonModelException(f"model '{name}' is not fetched; run: python cli.py fetch {name}")
    return model_dir


def _make_drafter(choice: str, dtype: str, config: EngineConfig, target, runtime: str, drafter_onnx: Path | None):
    """none | prompt_lookup | model:<name or dir> | checkpoint:<trained drafter dir>, as check_drafter_setting
    accepted it -> a drafter (or None).

    A trained drafter runs on the target's runtime (its exported graphs on onnxruntime: the ones
    shipped in ``drafter_onnx``, else exported into the cache)."""
    if choice == "none":
        return None
    if choice == "prompt_lookup":
        return PromptLookupDrafter()
    if choice.startswith("model:"):
        drafter_dir = _resolve_model_dir(choice[len("model:"):])
        model = load_runner(drafter_dir, "torch", compute_dtype(dtype))  # an int8 target's drafter: float32
        vocab = cached_draft_vocab(cache_dir(), drafter_dir, model.config.vocab_size, always=model.config.eos_token_ids)
        return ModelDrafter(model, config.max_batch_size, config.max_context, vocab)
    module = load_feature_drafter(drafter_checkpoint(choice), target, runtime, drafter_onnx)
    return FeatureDrafter(module, config.max_batch_size, config.max_context)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        model_dir = _resolve_model_dir(os.environ.get("DSPARK_MODEL") or params["model"])
        threads = int(params["num_threads"]) or usable_cores()
        torch.set_num_threads(threads)
        dtype = resolve_dtype(os.environ.get("DSPARK_DTYPE") or params["dtype"])  # auto: bf16 where the CPU has it
        config = EngineConfig(
            max_batch_size=int(params["max_batch_size"]),
            max_context=int(params["max_context"]),
            max_tokens_limit=int(params["max_tokens_limit"]),
            default_spec=SpeculationParams(params["spec_mode"], int(params["num_draft_tokens"])),
        )
        self.encoder = PromptEncoder.from_model_dir(model_dir, config.max_context - 1)
        # runtime: torch | onnxruntime | tensorrt; onnx_model: a graph shipped in this version dir
        # (written by `cli.py build`), else the export is taken from or made into the cache.
        # An export made here outputs the hidden states the drafter taps.
        onnx_model = params.get("onnx_model", "")
        if onnx_model:
            try:
                check_graph_source(Path(args["model_repository"]) / args["model_version"] / onnx_model, model_dir)
            except ValueError as exc:
                raise pb_utils.TritonModelException(str(exc)) from None
        try:  # refused from configuration files alone, before any weights load
            drafter_choice, lookup_first = check_drafter_setting(os.environ.get("DSPARK_DRAFTER") or params["drafter"],
                                                                 model_dir)
        except DrafterMismatchError as exc:
            raise pb_utils.TritonModelException(f"{exc}; set the drafter parameter in config.pbtxt (or DSPARK_DRAFTER) "
                                                "to one trained for this target, or to auto") from exc
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        try:  # a shipped graph must output the hidden states this drafter taps
            runner = load_runner(
                model_dir, params.get("runtime", "torch"), dtype,
                onnx_path=Path(args["model_repository"]) / args["model_version"] / onnx_model if onnx_model else None,
                tap_layers=drafter_tap_layers(drafter_choice), num_threads=threads, max_batch=config.max_batch_size,
                max_new=config.max_context, max_context=config.max_context,
            )
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        runtime = params.get("runtime", "torch")
        drafter_onnx = params.get("drafter_onnx", "")
        drafter = _make_drafter(drafter_choice, dtype, config, runner, runtime,
                                Path(args["model_repository"]) / args["model_version"] / drafter_onnx if drafter_onnx else None)
        if lookup_first:
            drafter = LookupFirstDrafter(drafter)
        model_drafter = drafter.model if isinstance(drafter, LookupFirstDrafter) else drafter
        if isinstance(model_drafter, FeatureDrafter):
            pb_utils.Logger.log_info(f"dspark: target on {runtime}, drafter {drafter.name} on "
                                     f"{getattr(model_drafter.module, 'runtime', 'torch')}")
        step_cost = load_or_measure(profile_path(cache_dir(), model_dir, runtime, dtype, threads), runner)
        self.engine = Engine(runner, self.encoder.tokenizer, config, drafter, step_cost)
        self.engine.start()
        if not on_sigterm(self.engine.shutdown):  # `cli.py stop` signals this stub before the server
            pb_utils.Logger.log_warn("dspark: not on the stub's main thread; a stop will wait for Triton's exit timeout")
        self.metrics = _EngineMetrics(self.engine)
        self.load_monitor = None
        if os.environ.get("DSPARK_METRICS_URL"):
            self.load_monitor = LoadMonitor(
                os.environ["DSPARK_METRICS_URL"], args["model_name"],
                lambda reading: setattr(self.engine, "external_waiting", reading.pending_requests),
            ).start()

    def _encode_words(self, text: str) -> list[int]:
        """A bad word's token ids, as the text would be tokenized inside an answer (no special tokens)."""
        return self.encoder.tokenizer.encode(text, add_special_tokens=False).ids

    def execute(self, requests):
        """Hands each request to the engine; every request of the batch gets an answer, whatever fails."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                refuse_parameters(request.parameters())
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                check_one_prompt(inputs)
                prompt_ids = parse_prompt_ids(inputs) if "input_ids" in inputs else self.encoder.encode_request(inputs)
                params = parse_sampling_params(inputs, self._encode_words)
                spec = parse_speculation(inputs, self.engine.config.default_spec)
                stream = _ResponseStream(sender, parse_bool(inputs, "stream", False))
                self.engine.submit(prompt_ids, params, emit=stream, is_cancelled=sender.is_cancelled, spec=spec)
            except InvalidRequestError as exc:
                sender.send(_error(str(exc)), flags=FINAL)
            except EngineStoppedError as exc:  # the model is unloading: not this request's fault, nor ours
                sender.send(_error(str(exc), pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
            except Exception as exc:  # not the client's fault, but still this request's only answer
                log.exception("request failed before reaching the engine")
                sender.send(_error(f"internal error: {exc}"), flags=FINAL)
        return None

    def finalize(self):
        if self.load_monitor is not None:
            self.load_monitor.stop()
        self.engine.shutdown()
        self.metrics.close()
