"""Weight dynamics: how big each module's parameters are, and how far they are from another checkpoint's.

For layer l and module M (block: the whole decoder layer, norms included; attention and mlp: the sub-modules a
family names so, `Adapter.module_path`), with theta the module's parameters at this checkpoint:

    weight_norm          ||theta||_F
    weight_change_final  ||theta - theta_ref||_F / ||theta_ref||_F     (ref: the scan's reference checkpoint)
    weight_change_prev   ||theta - theta_prev||_F / ||theta_prev||_F   (prev: the line's checkpoint before this one)

read straight from the weight files, tensor by tensor (no model is built: memory holds the largest tensor of each
checkpoint and one difference, in float32), with every sum of squares accumulated in float64. 16-bit weights are
widened to float32 first, so that each difference is exact to float32's rounding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import polars as pl
import torch
from torch import nn

from ..errors import SourceError, one_line
from ..fetch.identity import weight_files
from ..model.adapters import locate
from ..model.loading import load_errors
from ..store import MODULES
from .metrics import SCORE_SCHEMA

Structure = tuple[str, list[dict[str, list[str]]]]
"""Where a model's decoder layers sit (`Adapter.layers`), and per layer the names of each module's parameters,
relative to the layer."""


def structure(model: nn.Module) -> Structure:
    """The parameters of every layer's block, attention and MLP, named as inside the layer."""
    layout = locate(model)
    layers = []
    for taps in layout.layers:
        names = {"block": [name for name, _ in taps.block.named_parameters()]}
        for kind in ("attention", "mlp"):
            path = layout.adapter.module_path(kind)
            names[kind] = [f"{path}.{name}" for name, _ in taps.block.get_submodule(path).named_parameters()]
        layers.append(names)
    return layout.adapter.layers, layers


class WeightFiles:
    """The decoder-layer tensors of one checkpoint's weight files, read one at a time (see `open_weights`)."""

    def __init__(self, folder: Path, layers: str, opened: dict[str, object]):
        self.folder = folder
        pattern = re.compile(rf"(?:^|\.){re.escape(layers)}\.(\d+)\.(.+)$")
        self._where: dict[tuple[int, str], tuple[object, str]] = {}
        for handle in opened.values():
            for key in handle.keys():
                if (found := pattern.search(key)) is not None:
                    self._where[int(found[1]), found[2]] = (handle, key)

    def get(self, layer: int, name: str) -> torch.Tensor:
        """Parameter `name` of decoder layer `layer`, as stored, on the CPU."""
        try:
            handle, key = self._where[layer, name]
        except KeyError:
            raise SourceError(f"the weight files in {self.folder} lack layer {layer}'s parameter {name!r}") from None
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]


@contextmanager
def open_weights(folder: str | os.PathLike, layers: str) -> Iterator[WeightFiles]:
    """A checkpoint's weight files (safetensors where present, else ``.bin``), opened for reading tensor by tensor:
    safetensors through `safe_open`, ``.bin`` mapped by torch (neither reads a tensor before it is asked for)."""
    from safetensors import safe_open

    folder = Path(folder)
    fmt, names = weight_files(p.name for p in folder.iterdir())
    if fmt is None:
        raise SourceError(f"{folder} holds no weight files (.safetensors or .bin)")
    with ExitStack() as stack:
        opened: dict[str, object] = {}
        for name in (n for n in names if not n.endswith(".json")):
            try:
                if fmt == "safetensors":
                    opened[name] = stack.enter_context(safe_open(folder / name, framework="pt"))
                else:
                    opened[name] = torch.load(folder / name, map_location="cpu", mmap=True, weights_only=True)
            except load_errors() as err:
                raise SourceError(f"cannot read the weights in {folder / name}: {one_line(err)}") from err
        yield WeightFiles(folder, layers, opened)


def _squared(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of squares of a tensor's elements, accumulated in float64."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float64).square()


def weight_metrics(folder: str | os.PathLike, shape: Structure, reference: str | os.PathLike | None = None,
                   previous: str | os.PathLike | None = None) -> pl.DataFrame:
    """`weight_norm` of every layer and module of the checkpoint in `folder`, and its `weight_change_final` against
    the checkpoint in `reference` and `weight_change_prev` against the one in `previous` where given; a long frame
    of layer, module, metric, value (n_tokens null: no token is involved)."""
    layers, per_layer = shape
    others = [p for p in (reference, previous) if p is not None]
    # Per layer and module: ||theta||^2, then ||theta - other||^2 and ||other||^2 for each other checkpoint.
    sums = torch.zeros(len(per_layer), len(MODULES), 1 + 2 * len(others), dtype=torch.float64)
    with ExitStack() as stack:
        here = stack.enter_context(open_weights(folder, layers))
        against = [stack.enter_context(open_weights(p, layers)) for p in others]
        for layer, names in enumerate(per_layer):
            members = [set(names[m]) for m in MODULES]
            for name in names["block"]:
                theta = here.get(layer, name).float()  # 16-bit weights widened: their differences are exact
                values = [_squared(theta)]
                for files in against:
                    other = files.get(layer, name).float()
                    if other.shape != theta.shape:
                        raise SourceError(f"layer {layer}'s {name} is {tuple(theta.shape)} in {here.folder} but "
                                          f"{tuple(other.shape)} in {files.folder}: not checkpoints of one model")
                    values += [_squared(theta - other), _squared(other)]
                    del other
                row = torch.stack(values)
                for i, member in enumerate(members):
                    if name in member:
                        sums[layer, i] += row
    rows = []
    metrics = ["weight_norm"] + [m for m, p in (("weight_change_final", reference), ("weight_change_prev", previous))
                                 if p is not None]
    for layer in range(len(per_layer)):
        for i, module in enumerate(MODULES):
            values = [sums[layer, i, 0].sqrt()] + [
                (sums[layer, i, 1 + 2 * j] / sums[layer, i, 2 + 2 * j]).sqrt() for j in range(len(others))]
            rows += [(layer, module, metric, float(value), None) for metric, value in zip(metrics, values)]
    return pl.DataFrame(rows, schema=SCORE_SCHEMA, orient="row")
