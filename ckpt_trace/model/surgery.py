"""Model surgery: attention layers, MLPs and whole blocks taken out of a loaded model.

A dropped attention layer is replaced by a stand-in that adds nothing to the residual
stream, computes no attention and holds no KV cache (its cache slot becomes transformers'
``DummyLayer``); a dropped MLP adds nothing and computes nothing. A dropped block is removed
from the layer list, so a block-dropped model is a plain Hugging Face model. What an
attention- or MLP-dropped model lacks is recorded in its config, under ``ckpt_trace_pruned``,
so that loading can drop the same modules again. Every change has a context manager that
undoes it on exit and an in-place twin whose name ends in ``_``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import adapter_for_type

PRUNED_KEY = "ckpt_trace_pruned"


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


def layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    adapter = adapter_for_type(model.config.model_type)
    base = getattr(model, "base_model", model)
    parent_path, _, name = adapter.layers.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    return parent, name, getattr(parent, name)


def _swap(model: nn.Module, attention: Iterable[int], mlp: Iterable[int]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put stand-ins in place of the given modules; return (parent, name, original) for each."""
    adapter = adapter_for_type(model.config.model_type)
    _, _, layers = layer_list(model)
    swapped = []
    for kind, indices in (("attention", attention), ("mlp", mlp)):
        parent_path, _, name = adapter.module_path(kind).rpartition(".")
        for index in sorted(set(indices)):
            parent = layers[index].get_submodule(parent_path) if parent_path else layers[index]
            original = getattr(parent, name)
            if isinstance(original, (DroppedAttention, DroppedMLP)):
                continue
            stand_in = DroppedAttention(getattr(original, "layer_idx", index)) if kind == "attention" else DroppedMLP()
            setattr(parent, name, stand_in)
            swapped.append((parent, name, original))
    return swapped


@contextmanager
def dropped(model: nn.Module, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> Iterator[nn.Module]:
    """The model with these attention and MLP layers dropped; the originals come back on exit, even on error."""
    swapped = _swap(model, attention, mlp)
    try:
        yield model
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)


def pruned_record(config) -> dict[str, list[int]]:
    """What a model's config (an object, or the dict of config.json) says was dropped: {"attention": [...], "mlp": [...]}."""
    record = (config.get(PRUNED_KEY) if isinstance(config, dict) else getattr(config, PRUNED_KEY, None)) or {}
    return {"attention": list(record.get("attention", [])), "mlp": list(record.get("mlp", []))}


def drop_modules_(model: nn.Module, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> nn.Module:
    """Drop attention and MLP layers in place, and record them in the config (the in-place twin of `dropped`)."""
    attention, mlp = set(attention), set(mlp)
    _swap(model, attention, mlp)
    record = pruned_record(model.config)
    setattr(model.config, PRUNED_KEY, {
        "attention": sorted(set(record["attention"]) | attention), "mlp": sorted(set(record["mlp"]) | mlp),
    })
    return model


def drop_blocks_(model: nn.Module, blocks: Iterable[int]) -> nn.Module:
    """Remove whole decoder layers in place; the result is a plain Hugging Face model of fewer layers."""
    parent, name, layers = layer_list(model)
    blocks = set(blocks)
    keep = [i for i in range(len(layers)) if i not in blocks]
    setattr(parent, name, nn.ModuleList(layers[i] for i in keep))
    for new_index, layer in enumerate(getattr(parent, name)):
        for module in layer.modules():  # cache slots follow the new numbering
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    record = pruned_record(config)
    if any(record.values()):  # renumber what was dropped before
        position = {old: new for new, old in enumerate(keep)}
        setattr(config, PRUNED_KEY, {k: [position[i] for i in v if i in position] for k, v in record.items()})
    return model


def apply_(model: nn.Module, chosen: list[tuple[str, int]]) -> nn.Module:
    """Drop the chosen (module, layer) pairs in place: blocks are removed, attention and MLP replaced."""
    blocks = [layer for module, layer in chosen if module == "block"]
    if blocks:
        return drop_blocks_(model, blocks)
    return drop_modules_(
        model,
        [layer for module, layer in chosen if module == "attention"],
        [layer for module, layer in chosen if module == "mlp"],
    )


def module_prefixes(model: nn.Module, record: dict[str, list[int]]) -> list[str]:
    adapter = adapter_for_type(model.config.model_type)
    names = {id(m): n for n, m in model.named_modules()}
    _, _, layers = layer_list(model)
    return [
        names[id(layers[index].get_submodule(adapter.module_path(kind)))] + "."
        for kind, indices in record.items() for index in indices
    ]
