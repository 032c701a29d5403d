"""Our transformer against transformers' reference implementations, and its cache semantics.

Tolerances (fp32 on both sides): the two implementations do the same maths in a different order
(fused q/k/v and gate/up matmuls, SDPA instead of eager softmax, batched vs single rows), so
they differ by float32 rounding that accumulates over the layers. Measured on SmolLM2 (30
layers, logits up to ~35 in magnitude) the difference is ~5e-5; we allow 1e-4 of the largest
logit magnitude (~3.5e-3 absolute). A real bug (wrong RoPE position, mask, bias, norm, head
layout) moves logits by O(0.1-10), orders of magnitude above that.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.loading import load_token_matrices, load_transformer
from models.projection import KernelPlan, packed_supported
from models.transformer import Transformer

REL_TOL = 1e-4
PROMPTS = [
    "def quicksort(arr):",
    "The three most important things to know before adopting a dog are",
    "Question: A train travels 60 km in 45 minutes. What is its average speed in km/h?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(1.0, ref.abs().max().item())
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} x logit scale {scale:.3g}"


def prefill(model: Transformer, cache: KVCache, slot: int, ids: list[int]) -> torch.Tensor:
    """Logits of every position of `ids` appended to `slot`."""
    return model(torch.tensor(ids), [slot], [len(ids)], cache).logits


def greedy_decode(model: Transformer, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuation of several prompts decoded together: one packed prefill of different
    lengths, then `steps - 1` batched single-token steps over slots of different lengths."""
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + steps)
    slots = [cache.allocate() for _ in prompts]
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    out = model(ids, slots, lens, cache, logits_indices=model.last_token_indices(lens))
    nxt = out.logits.argmax(-1)
    generated = [[int(t)] for t in nxt]
    for _ in range(steps - 1):
        nxt = model(nxt, slots, [1] * len(slots), cache).logits.argmax(-1)
        for g, t in zip(generated, nxt):
            g.append(int(t))
    assert cache.lengths[slots].tolist() == [n + steps - 1 for n in lens]
    return generated


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny matmuls gain little from two, and a busy shared machine
    (a server or another test run on the other core) makes OpenMP barriers stall for seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- the real model (SmolLM2-135M)


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Transformer:
    return load_transformer(smollm2_dir, torch.float32)


@pytest.fixture(scope="module")
def smol_hf(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def smol_prompts(smollm2_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    return [tok.encode(p).ids for p in PROMPTS]


def test_loads_config_and_weights(smol: Transformer) -> None:
    c = smol.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and smol.lm_head_weight is smol.embed
    assert not smol.training
    assert all(not p.requires_grad for p in smol.parameters())


@torch.inference_mode()
def test_prefill_logits_match_transformers(smol, smol_hf, smol_prompts) -> None:
    cache = smol.new_cache(1, 128)
    for ids in smol_prompts:
        cache.truncate(0, 0)
        ours = prefill(smol, cache, 0, ids)
        ref = smol_hf(torch.tensor([ids])).logits[0]
        assert_logits_close(ours, ref)


@torch.inference_mode()
def test_greedy_tokens_match_transformers_generate(smol, smol_hf, smol_prompts) -> None:
    steps = 40
    prompts = [smol_prompts[0], smol_prompts[1], smol_prompts[3]]
    ours = greedy_decode(smol, prompts, steps)
    for ids, got in zip(prompts, ours):
        ref = smol_hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=steps, pad_token_id=0)
        ref = ref[0, len(ids):].tolist()
        assert len(ref) >= 32, "prompt ended in EOS too early to be a useful check"
        assert got[: len(ref)] == ref


@torch.inference_mode()
def test_decode_logits_match_transformers_full_forward(smol, smol_hf, smol_prompts) -> None:
    """Cached step-by-step logits equal a full uncached forward over the whole sequence."""
    ids = smol_prompts[1]
    cache = smol.new_cache(1, 64)
    steps = [smol(torch.tensor(ids), [0], [len(ids)], cache, logits_indices=torch.tensor([len(ids) - 1])).logits]
    seq = list(ids)
    for _ in range(12):
        seq.append(int(steps[-1].argmax(-1)))
        steps.append(smol(torch.tensor(seq[-1:]), [0], [1], cache).logits)
    ref = smol_hf(torch.tensor([seq])).logits[0, len(ids) - 1:]
    assert_logits_close(torch.cat(steps), ref)


@torch.inference_mode()
@pytest.mark.parametrize("slot_order", [[0, 1, 2, 3, 4], [4, 0, 3, 1, 2]])
def test_batched_varlen_equals_separate_forwards(smol, smol_prompts, slot_order) -> None:
    # sequences sharing a new-token count attend together (1 and 4 twice, at different positions)
    prefixes = [smol_prompts[0][:5], smol_prompts[1][:9], smol_prompts[2][:2], smol_prompts[1][:3], smol_prompts[3][:2]]
    new = [smol_prompts[3][:1], smol_prompts[3][1:5], smol_prompts[2][2:9], smol_prompts[2][:1], smol_prompts[3][2:6]]
    counts = [len(n) for n in new]
    assert counts == [1, 4, 7, 1, 4]

    separate = []
    for pre, nw in zip(prefixes, new):
        cache = smol.new_cache(1, 32)
        prefill(smol, cache, 0, pre)
        separate.append(prefill(smol, cache, 0, nw))

    cache = smol.new_cache(5, 32)
    for slot, pre in zip(slot_order, prefixes):
        prefill(smol, cache, slot, pre)
    out = smol(torch.tensor([t for nw in new for t in nw]), slot_order, counts, cache)
    assert out.logits.shape == (17, smol.config.vocab_size)
    assert_logits_close(out.logits, torch.cat(separate))
    assert cache.lengths[slot_order].tolist() == [6, 13, 9, 4, 6]

    # selected rows only: the last token of each sequence
    cache2 = smol.new_cache(5, 32)
    for slot, pre in zip(slot_order, prefixes):
        prefill(smol, cache2, slot, pre)
    idx = smol.last_token_indices(counts)
    sel = smol(torch.tensor([t for nw in new for t in nw]), slot_order, counts, cache2, logits_indices=idx)
    assert_logits_close(sel.logits, torch.stack([s[-1] for s in separate]))


@torch.inference_mode()
def test_rollback_then_refeed_equals_fresh_prefill(smol, smol_prompts) -> None:
    a, b, c = smol_prompts[1][:6], smol_prompts[0][:5], smol_prompts[2][:4]
    cache = smol.new_cache(2, 64)
    other = cache.allocate()
    slot = cache.allocate()
    prefill(smol, cache, other, smol_prompts[3])  # a neighbour that must not be disturbed
    prefill(smol, cache, slot, a + b)
    cache.truncate(slot, len(a))
    assert int(cache.lengths[slot]) == len(a)
    got = prefill(smol, cache, slot, c)

    fresh = smol.new_cache(1, 64)
    want = prefill(smol, fresh, 0, a + c)[len(a):]
    assert_logits_close(got, want)
    # rollback through the speculative path too: one more token after a 1-token truncation
    cache.truncate(slot, len(a) + len(c) - 1)
    again = prefill(smol, cache, slot, c[-1:])
    assert_logits_close(again, want[-1:])
    # the neighbour's cache is intact
    nxt = prefill(smol, cache, other, [c[0]])
    ref_cache = smol.new_cache(1, 64)
    assert_logits_close(nxt, prefill(smol, ref_cache, 0, smol_prompts[3] + [c[0]])[-1:])


@torch.inference_mode()
def test_hidden_state_taps(smol, smol_hf, smol_prompts) -> None:
    n_layers = smol.config.num_layers
    taps = (0, 7, n_layers - 1, n_layers)
    cache = smol.new_cache(2, 64)
    lens = [len(smol_prompts[0]), len(smol_prompts[1])]
    ids = torch.tensor(smol_prompts[0] + smol_prompts[1])
    idx = smol.last_token_indices(lens)
    out = smol(ids, [0, 1], lens, cache, logits_indices=idx, tap_layers=taps)
    assert set(out.hidden_states) == set(taps)
    for t in taps:
        assert out.hidden_states[t].shape == (sum(lens), smol.config.hidden_size)
    # the last tap is exactly what the LM head reads
    head = F.linear(out.hidden_states[n_layers][idx], smol.lm_head_weight).float()
    torch.testing.assert_close(head, out.logits, rtol=0, atol=0)
    # and taps agree with transformers' hidden_states (index i+1 = output of layer i; last one is normed)
    ref = smol_hf(torch.tensor([smol_prompts[1]]), output_hidden_states=True).hidden_states
    mine = {t: h[lens[0]:] for t, h in out.hidden_states.items()}
    for t in (0, 7):
        assert_logits_close(mine[t], ref[t + 1][0])
    assert_logits_close(mine[n_layers], ref[n_layers][0])
    with pytest.raises(ValueError):
        smol(ids[:1], [0], [1], cache, tap_layers=(n_layers + 1,))


def test_runs_with_and_without_inference_mode(smol, smol_prompts) -> None:
    ids = smol_prompts[0]
    cache = smol.new_cache(1, 32)
    out = smol(torch.tensor(ids), [0], [len(ids)], cache)
    assert out.logits.dtype == torch.float32 and not out.logits.requires_grad
    with torch.inference_mode():  # a cache built in inference mode stays usable outside it
        cache2 = smol.new_cache(1, 32)
        cache2.allocate()
        inside = smol(torch.tensor(ids[:3]), [0], [3], cache2).logits
    outside = smol(torch.tensor(ids[3:]), [0], [len(ids) - 3], cache2).logits
    cache2.truncate(0, 3)
    assert_logits_close(torch.cat([inside, outside]), out.logits)


@torch.inference_mode()
def test_bf16_close_to_fp32(smollm2_dir, smol, smol_prompts) -> None:
    model = load_transformer(smollm2_dir, torch.bfloat16)
    assert model.dtype == torch.bfloat16
    cache = model.new_cache(1, 64)
    assert cache.k_all.dtype == torch.bfloat16
    ids = smol_prompts[2]
    got = prefill(model, cache, 0, ids)
    want = prefill(smol, smol.new_cache(1, 64), 0, ids)
    assert got.dtype == torch.float32
    # bf16 has an 8-bit mantissa: logits move by ~1% of their scale, the ranking mostly holds
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree > 0.8


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_plan_keeps_the_models_outputs(smollm2_dir, smol_prompts, dtype) -> None:
    """Decode and verify steps through every kernel a plan can pick give F.linear's logits and greedy tokens."""
    model = load_transformer(smollm2_dir, dtype)
    ids = smol_prompts[2]
    cache = model.new_cache(1, 64)

    def steps() -> list[torch.Tensor]:
        cache.truncate(0, 0)
        out = [prefill(model, cache, 0, ids)]
        for n in (1, 3, 8):  # a decode step, then verify-sized steps
            out.append(model(torch.tensor(ids[:n]), [0], [n], cache).logits)
        return out

    model.use_kernel_plan(None)
    want = steps()
    names = ("linear", "weight_left") + (("packed",) if packed_supported(dtype) else ())
    for name in names:
        model.use_kernel_plan(KernelPlan((64,), (name,)))
        for got, ref in zip(steps(), want):
            scale = ref.abs().max()
            assert (got - ref).abs().max() < (1e-4 if dtype == torch.float32 else 0.05) * scale, name
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= (1.0 if dtype == torch.float32 else 0.9), name


@torch.inference_mode()
def test_bad_calls_raise(smol) -> None:
    cache = smol.new_cache(2, 8)
    with pytest.raises(ValueError):  # past max_len
        smol(torch.arange(9), [0], [9], cache)
    with pytest.raises(ValueError):  # duplicate slot
        smol(torch.arange(2), [0, 0], [1, 1], cache)
    with pytest.raises(ValueError):  # token count mismatch
        smol(torch.arange(3), [0, 1], [1, 1], cache)
    assert cache.lengths.tolist() == [0, 0]


# ---------------------------------------------------------------- KV cache slots


def tiny_config(**overrides) -> TransformerConfig:
    base = dict(
        model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=False, qk_norm=False, max_position_embeddings=128,
        bos_token_id=1, eos_token_ids=(2,),
    )
    return TransformerConfig(**{**base, **overrides})


def test_cache_allocate_free_full() -> None:
    cache = KVCache(tiny_config(), num_slots=3, max_len=16, dtype=torch.float32)
    assert cache.k[0].shape == (3, 2, 16, 8) and len(cache.v) == 2
    assert cache.lengths.dtype == torch.int64 and cache.lengths.shape == (3,)
    assert cache.num_free() == 3
    slots = [cache.allocate() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and cache.num_free() == 0
    with pytest.raises(RuntimeError):
        cache.allocate()
    cache.lengths[1] = 5
    cache.free(1)
    assert cache.num_free() == 1 and int(cache.lengths[1]) == 0
    with pytest.raises(ValueError):
        cache.free(1)  # double free
    cache.lengths[2] = 7
    cache.truncate(2, 3)
    assert int(cache.lengths[2]) == 3
    with pytest.raises(ValueError):
        cache.truncate(2, 4)  # cannot grow by truncating
    assert cache.allocate() == 1 and int(cache.lengths[1]) == 0


# ---------------------------------------------------------------- synthetic families vs transformers


def _hf_model(kind: str, tie: bool, rope: dict | None):
    import transformers

    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    rope_params = {"rope_theta": 5000.0, "rope_type": "default", **(rope or {})}
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, head_dim=16, rope_parameters=rope_params)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_parameters=rope_params)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=24, rope_parameters=rope_params)  # head_dim != hidden/heads
        cls = transformers.Qwen3ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    # random everything, norms and biases included, so that every parameter matters
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        sd[name] = 1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.2 * noise
    model.load_state_dict(sd)
    return model


SYNTHETIC = [
    ("llama", False, None),
    ("llama", True, {"rope_type": "linear", "factor": 2.0}),
    ("llama", False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    ("llama", False, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ("qwen2", False, None),
    ("qwen2", True, None),
    ("qwen3", False, None),
    ("qwen3", True, None),
]


@torch.inference_mode()
@pytest.mark.parametrize("kind,tie,rope", SYNTHETIC, ids=lambda v: str(v.get("rope_type")) if isinstance(v, dict) else str(v))
def test_synthetic_family_matches_transformers(tmp_path, kind, tie, rope) -> None:
    hf = _hf_model(kind, tie, rope)
    hf.save_pretrained(tmp_path)
    ours = load_transformer(tmp_path)
    c = ours.config
    assert c.model_type == kind and c.tie_word_embeddings == tie
    assert c.attention_bias == (kind == "qwen2") and c.qk_norm == (kind == "qwen3")
    assert (c.rope_scaling or {}).get("rope_type") == (rope or {}).get("rope_type")
    if kind == "qwen2":
        assert ours.layers[0].qkv_bias is not None and ours.layers[0].qkv_bias.abs().sum() > 0

    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (11, 70, 5)]
    # full prefill logits (positions up to 70 pass the llama3/yarn original context of 32/64)
    cache = ours.new_cache(3, 128)
    for slot, s in enumerate(seqs):
        assert_logits_close(prefill(ours, cache, slot, s), hf(torch.tensor([s])).logits[0])
    # greedy decode, batched over slots of different lengths
    steps = 10
    got = greedy_decode(ours, seqs, steps)
    for s, tokens in zip(seqs, got):
        seq = list(s)
        for _ in range(steps):  # plain argmax loop: random weights emit EOS, which generate() would treat specially
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        assert tokens == seq[len(s):]


def test_ar_decode_benchmark_runs_and_matches(smollm2_dir) -> None:
    from benchmarks.ar_decode import format_ar_decode_table, run_ar_decode_benchmark

    result = run_ar_decode_benchmark(smollm2_dir, torch.float32, PROMPTS[:2], new_tokens=6, threads=1)
    assert result["num_prompts"] == 2 and result["threads"] == 1 and result["dtype"] == "float32"
    assert result["ours_tok_s"] > 0 and result["transformers_tok_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_tok_s"] / result["transformers_tok_s"])
    assert result["all_match"], [r["first_mismatch"] for r in result["per_prompt"]]
    assert all(len(r["ours_tokens"]) == 6 for r in result["per_prompt"])
    table = format_ar_decode_table(result)
    assert "ours tok/s" in table and "all match" in table


def test_token_matrices_alone_equal_the_full_load(smol, smollm2_dir: Path) -> None:
    embed, head = load_token_matrices(smollm2_dir)
    assert torch.equal(embed, smol.embed) and torch.equal(head, smol.lm_head_weight)
