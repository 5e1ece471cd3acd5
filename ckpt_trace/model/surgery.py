"""Model surgery: attention layers, MLPs and whole blocks taken out of a loaded model.

A dropped attention layer or MLP is replaced by a stand-in of `ckpt_trace.model.dropped` that
adds nothing to the residual stream and computes nothing. A dropped block is removed
from the layer list, so a block-dropped model is a plain Hugging Face model. What an
attention- or MLP-dropped model lacks is recorded in its config, under ``ckpt_trace_pruned``,
so that loading can drop the same modules again. Every change has a context manager that
undoes it on exit and an in-place twin whose name ends in ``_``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from .adapters import adapter_for_type
from .dropped import DroppedAttention, DroppedMLP, swap_

__all__ = ["DroppedAttention", "DroppedMLP", "PRUNED_KEY", "apply_", "drop_blocks_", "drop_modules_", "dropped",
           "layer_list", "module_prefixes", "pruned_record"]

PRUNED_KEY = "ckpt_trace_pruned"


def layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    adapter = adapter_for_type(model.config.model_type)
    base = getattr(model, "base_model", model)
    parent_path, _, name = adapter.layers.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    return parent, name, getattr(parent, name)


def _swap(model: nn.Module, attention: Iterable[int], mlp: Iterable[int]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put stand-ins in place of the given modules; return (parent, name, original) for each."""
    adapter = adapter_for_type(model.config.model_type)
    paths = {kind: adapter.module_path(kind) for kind in ("attention", "mlp")}
    return swap_(layer_list(model)[2], paths, {"attention": list(attention), "mlp": list(mlp)})


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
