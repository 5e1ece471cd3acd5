"""Stand-ins for dropped attention layers and MLPs, and the surgery that puts them in place.

This module imports nothing but torch and transformers: a pruned model folder ships it, verbatim, as the first part
of its modeling code (see `ckpt_trace.model.portable`), so that plain transformers builds the same model that
ckpt-trace loads, on a machine without ckpt-trace.

A dropped attention layer adds nothing to the residual stream, computes no attention and holds no KV cache (its cache
slot becomes transformers' ``DummyLayer``); a dropped MLP adds nothing and computes nothing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def _zeros_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(()).expand_as(x)  # a broadcast view of one zero: no memory


@functools.cache
def _dropped_slot_class() -> type:
    """The cache slot of a dropped attention layer: a transformers `DummyLayer`, which holds nothing and which caches
    skip when they report lengths, that answers for the sequence length where it is asked all the same (from 5.25,
    a cache asks its layer 0 whatever that layer is): the length of the first slot that holds keys."""
    from transformers.cache_utils import DummyLayer

    class DroppedSlot(DummyLayer):
        def __init__(self, layers: list):
            super().__init__()
            self._layers = layers

        def get_seq_length(self) -> int:
            return next((s.get_seq_length() for s in self._layers if not isinstance(s, DummyLayer)), 0)

    return DroppedSlot


def _release_cache_slot(cache, layer_idx: int) -> None:
    """Make a dropped layer's cache slot hold nothing (see `_dropped_slot_class`); slots that a cache creates on first
    use are created up to it."""
    cache = getattr(cache, "self_attention_cache", cache)
    layers, slot = cache.layers, _dropped_slot_class()
    while len(layers) <= layer_idx and cache.layer_class_to_replicate is not None:
        layers.append(cache.layer_class_to_replicate())
    if layer_idx < len(layers) and not isinstance(layers[layer_idx], slot):
        layers[layer_idx] = slot(layers)


class DroppedAttention(nn.Module):
    """A dropped attention layer: it adds nothing to the residual stream, computes nothing, and caches nothing.

    Families hand the cache to attention under different names (``cache``, ``past_key_values``,
    GPT-NeoX's ``layer_past``, or by position), so it is found by its type.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states=None, *args, **kwargs):
        from transformers.cache_utils import Cache

        cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
        if cache is not None:
            _release_cache_slot(cache, self.layer_idx)
        return _zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """A dropped MLP: it adds nothing to the residual stream and computes nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        return _zeros_like(hidden_states)


def swap_(layers: nn.ModuleList, paths: dict[str, str],
          drop: dict[str, list[int]]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put stand-ins in place of the dropped modules of a decoder-layer list; return (parent, name, original) for each.

    `paths` gives, for "attention" and "mlp", the module's path inside one decoder layer; `drop` the layer indices
    of each kind to drop. Modules already dropped are left as they are."""
    swapped = []
    for kind in ("attention", "mlp"):
        parent_path, _, name = paths[kind].rpartition(".")
        for index in sorted(set(drop.get(kind, ()))):
            parent = layers[index].get_submodule(parent_path) if parent_path else layers[index]
            original = getattr(parent, name)
            if isinstance(original, (DroppedAttention, DroppedMLP)):
                continue
            stand_in = DroppedAttention(getattr(original, "layer_idx", index)) if kind == "attention" else DroppedMLP()
            setattr(parent, name, stand_in)
            swapped.append((parent, name, original))
    return swapped
