"""Speed: prefill latency, decode throughput with the KV cache, peak memory and KV-cache bytes, after
warm-up, as medians with their spread, synchronised on GPU.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    cache = getattr(cache, "self_attention_cache", cache)
    return sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", []) for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


@torch.inference_mode()
def prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Run the prompt through the model with a fresh KV cache; return the last position's logits [B, 1, V] and the cache."""
    out = model(input_ids=ids, use_cache=True)
    return out.logits[:, -1:], out.cache


@torch.inference_mode()
def decode(model, cache, token: torch.Tensor, steps: int, keep_logits: bool = False):
    """Greedy decoding with the KV cache passed back in: feed `token` [B, 1], then each argmax, `steps` tokens in all.

    Returns the tokens fed [B, steps], the logits after each (when `keep_logits`), and the cache.
    """
    fed, kept = [], []
    for _ in range(steps):
        fed.append(token)
        logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:]
        if keep_logits:
            kept.append(logits)
        token = logits.argmax(-1)
    return torch.cat(fed, dim=1), kept if keep_logits else None, cache


@torch.inference_mode()
def measure_speed(model, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> dict:
    """Prefill latency, decode throughput with the KV cache, KV-cache bytes and peak memory of one model."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def timed_decode():
        last, cache = prefill(model, prompt)
        _sync(device)
        start = time.perf_counter()
        _, _, cache = decode(model, cache, last.argmax(-1), new_tokens)
        _sync(device)
        return time.perf_counter() - start, cache

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        timed_decode()
    prefill_times, decode_times = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        prefill(model, prompt)
        _sync(device)
        prefill_times.append(time.perf_counter() - start)
        seconds, cache = timed_decode()
        decode_times.append(seconds)
    rates = [new_tokens / s for s in decode_times]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "prefill_latency_s": statistics.median(prefill_times),
        "prefill_latency_s_spread": max(prefill_times) - min(prefill_times),
        "decode_tokens_per_s": statistics.median(rates),
        "decode_tokens_per_s_spread": max(rates) - min(rates),
        "kv_cache_bytes": float(kv_cache_bytes(cache)),
        # On the CPU this is the process's peak resident memory, not the model's alone.
        "peak_memory_bytes": float(peak),
    }
