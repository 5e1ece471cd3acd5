"""Decoding with the KV cache after attention layers are dropped: every family, every cache path.

The reference is the unpruned model with the same attention deltas zeroed by hooks, run over
the whole sequence without a cache: its positions and masks are those of the original model.
Sliding windows are shorter than the sequences, so sliding-window layers roll over.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, FAMILIES, LAYERS, make_model, random_ids
from test_pruning import zeroed
from transformers.cache_utils import DummyLayer, DynamicCache

from ckpt_trace.evaluation.speed import decode, kv_cache_bytes, measure_speed, prefill
from ckpt_trace.model.surgery import DroppedAttention, apply_

WINDOW = 4
PROMPT, NEW = 7, 6  # 13 tokens in all: more than three windows
# Sliding-window variants: all layers sliding (Mistral), and hybrids with full attention first or in the middle.
SLIDING = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1),
    "gemma2": dict(sliding_window=WINDOW),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}
# Layer 0 (the cache must find the sequence length in a later layer), a middle layer, and every layer but one.
DROPS = {"first": [0], "middle": [1], "all but last": [0, 1], "all but first": [1, 2]}


def build(family: str) -> torch.nn.Module:
    return make_model(family, **SLIDING.get(family, {}))


def full_pass_logits(family: str, chosen, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unpruned model with the same attention deltas zeroed, over all of `ids`, with no cache."""
    reference = build(family)
    with zeroed(reference, chosen), torch.no_grad():
        return reference(input_ids=ids, use_cache=False).logits  # [1, T, V]


def layer_bytes(cache) -> list[int]:
    """Bytes of keys and values in each slot of a cache, written out independently of the code under test."""
    return [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None) for layer in cache.layers]


@pytest.mark.parametrize("drop", sorted(DROPS))
@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_with_the_cache_equals_a_full_pass(family, drop):
    chosen = [("attention", layer) for layer in DROPS[drop]]
    pruned = apply_(build(family), chosen)
    prompt = torch.tensor(random_ids(1, PROMPT, seed=3))

    # The loop that eval --speed times: prefill, then one token at a time with the cache passed back in.
    last, cache = prefill(pruned, prompt)
    tokens, step_logits, cache = decode(pruned, cache, last.argmax(-1), NEW, keep_logits=True)
    ids = torch.cat([prompt, tokens], dim=1)
    expected = full_pass_logits(family, chosen, ids)
    # The logits after the prompt and after each fed token are those of positions PROMPT-1 .. end.
    torch.testing.assert_close(torch.cat([last, *step_logits], dim=1), expected[:, PROMPT - 1:], atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1] == PROMPT + NEW
    for layer in DROPS[drop]:
        assert isinstance(cache.layers[layer], DummyLayer) and cache.layers[layer].keys is None

    # generate() with the cache, greedy, gives the full pass's logits at every step.
    out = pruned.generate(prompt, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)
    expected = full_pass_logits(family, chosen, out.sequences)
    for i, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, expected[:, PROMPT - 1 + i], atol=1e-5, rtol=0)

    # KV bytes: exactly those of the kept layers of the unpruned model on the same tokens.
    original = build(family)
    _, full_cache = prefill(original, ids)
    kept = [b for i, b in enumerate(layer_bytes(full_cache)) if i not in DROPS[drop]]
    assert kv_cache_bytes(cache) == sum(layer_bytes(cache)) == sum(kept) > 0
    if family not in SLIDING or family == "mistral":  # every layer holds the same: (L - k) / L
        assert kv_cache_bytes(cache) * LAYERS == kv_cache_bytes(full_cache) * (LAYERS - len(DROPS[drop]))


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_a_cache_made_by_the_caller_and_filled_lazily(family):
    """A cache built without a config (slots appear on first use) and one built from the config both stay right."""
    chosen = [("attention", 0)]
    pruned = apply_(build(family), chosen)
    prompt = torch.tensor(random_ids(1, PROMPT, seed=4))
    for cache in (DynamicCache(), DynamicCache(config=pruned.config)):
        with torch.no_grad():
            out = pruned(input_ids=prompt, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            step = pruned(input_ids=token, cache=cache, use_cache=True)
        assert cache.get_seq_length() == PROMPT + 1 and isinstance(cache.layers[0], DummyLayer)
        expected = full_pass_logits(family, chosen, torch.cat([prompt, token], dim=1))
        torch.testing.assert_close(step.logits[:, -1], expected[:, -1], atol=1e-5, rtol=0)


def test_dropped_attention_finds_the_cache_under_any_keyword_or_position():
    cache = DynamicCache(config=CONFIGS["llama"])
    hidden = torch.randn(1, 2, 8)
    for call in (
        lambda m: m(hidden, cache=cache),
        lambda m: m(hidden_states=hidden, past_key_values=cache),
        lambda m: m(hidden, layer_past=cache),
        lambda m: m(hidden, None, cache),  # positional, after the attention mask
    ):
        cache.layers[1] = cache.layers[0].__class__()
        out, weights = call(DroppedAttention(1))
        assert isinstance(cache.layers[1], DummyLayer) and weights is None
        assert out.shape == hidden.shape and not out.any()


def test_eval_speed_on_half_the_attention_dropped():
    original = make_model("llama", num_hidden_layers=4)
    chosen = [("attention", 0), ("attention", 2)]
    pruned = apply_(make_model("llama", num_hidden_layers=4), chosen)
    full = measure_speed(original, prompt_tokens=16, new_tokens=4, repeats=2)
    half = measure_speed(pruned, prompt_tokens=16, new_tokens=4, repeats=2)
    assert half["kv_cache_bytes"] * 2 == full["kv_cache_bytes"] > 0
    # The decode that was timed computes what a full pass computes.
    prompt = torch.randint(0, original.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    last, cache = prefill(pruned, prompt)
    tokens, logits, _ = decode(pruned, cache, last.argmax(-1), 4, keep_logits=True)
    with zeroed(original, chosen), torch.no_grad():
        expected = original(input_ids=torch.cat([prompt, tokens], dim=1), use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, dim=1), expected[:, 16:], atol=1e-5, rtol=0)
    for key in ("prefill_latency_s", "decode_tokens_per_s", "peak_memory_bytes"):
        assert full[key] > 0 and half[key] > 0
