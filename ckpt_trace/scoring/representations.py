"""Representation dynamics: how alike each module's output is here and at another checkpoint, on the same tokens.

For layer l and module M with output X at this checkpoint (block: the layer's output y; attention: its delta a;
MLP: its delta m) and Y at the other checkpoint, both [n tokens, width] and centred per feature over the tokens,
linear CKA (Kornblith et al. 2019) is

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

in float64, from the model's activations: `cka_final` against the scan's reference checkpoint, `cka_prev` against
the line's checkpoint before this one. The tokens are every real calibration token when there are at most
`SAMPLE_TOKENS`, else a sample of that many drawn with `SAMPLE_SEED`: a function of the calibration set alone, so
every checkpoint of a scan is measured on the same tokens, in any batch size.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import polars as pl
import torch

from ..calibration.sets import CalibrationSet
from ..store import MODULES
from .metrics import SCORE_SCHEMA

SAMPLE_TOKENS = 4096
"""The most tokens CKA is measured on."""
SAMPLE_SEED = 0


def sampled(calibration: CalibrationSet, most: int | None = None, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """Which of the calibration set's real tokens, in the order its batches hold them, are measured: a bool mask
    (at most `most`, default `SAMPLE_TOKENS`)."""
    most = SAMPLE_TOKENS if most is None else most
    total = calibration.n_tokens
    chosen = torch.ones(total, dtype=torch.bool)
    if total > most:
        chosen[:] = False
        chosen[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:most]] = True
    return chosen


class OutputSample:
    """Every layer's block output, attention delta and MLP delta at the `sampled` tokens, gathered batch by batch
    during a scoring pass, in the model's dtype on the layer's device."""

    def __init__(self, calibration: CalibrationSet, n_layers: int):
        self._chosen = sampled(calibration)
        self._seen = 0
        self._index: dict[torch.device, torch.Tensor] = {}
        self._parts: list[list[list[torch.Tensor]]] = [[[] for _ in MODULES] for _ in range(n_layers)]

    @property
    def n_tokens(self) -> int:
        return int(self._chosen.sum())

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """Find the sampled tokens among the real ones of the batch about to run."""
        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # positions in [B * T], sequence by sequence
        chosen = self._chosen[self._seen:self._seen + real.numel()]
        self._seen += real.numel()
        index = real[chosen.to(real.device)]
        self._index = {index.device: index}

    def take(self, layer: int, *outputs: torch.Tensor) -> None:
        """Keep the sampled tokens' rows of a layer's block output, attention delta and MLP delta ([B, T, D] each)."""
        device = outputs[0].device
        if device not in self._index:
            self._index[device] = next(iter(self._index.values())).to(device)
        for parts, output in zip(self._parts[layer], outputs):
            parts.append(output.reshape(-1, output.shape[-1]).index_select(0, self._index[device]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """{"<layer>.<module>": [n tokens, width]} of the whole pass."""
        if self._seen != self._chosen.numel():
            raise RuntimeError(f"the pass saw {self._seen} real tokens of the calibration set's {self._chosen.numel()}")
        return {f"{layer}.{module}": torch.cat(parts) for layer, modules in enumerate(self._parts)
                for module, parts in zip(MODULES, modules)}


def save_outputs(outputs: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Keep a pass's sampled outputs on disk (safetensors, in their dtype) for the checkpoints measured against it."""
    from safetensors.torch import save_file

    save_file({key: t.detach().contiguous().cpu() for key, t in outputs.items()}, str(path))


def _centred(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    x = x.to(device or x.device, torch.float64)
    return x - x.mean(dim=0)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X, or X X^T where that is smaller: both have the same Frobenius norm."""
    return x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T


def self_norm(x: torch.Tensor, centred: bool = False) -> float:
    """||X^T X||_F of an output centred per feature, in float64."""
    return float(torch.linalg.matrix_norm(_gram(x if centred else _centred(x))))


def _cka(x: torch.Tensor, y: torch.Tensor, x_norm: float, y_norm: float) -> float:
    """CKA of two centred float64 outputs whose `self_norm`s are given."""
    if x.shape[1] <= x.shape[0]:  # ||Y^T X||^2
        cross = float((y.T @ x).square().sum())
    else:  # token by token, the same number: <X X^T, Y Y^T>
        cross = float((_gram(x) * _gram(y)).sum())
    return cross / (x_norm * y_norm) if x_norm > 0 and y_norm > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [n, width] outputs of the same n tokens, centred per feature, in float64 (NaN where one is
    constant)."""
    x, y = _centred(x), _centred(y, x.device)
    return _cka(x, y, self_norm(x, centred=True), self_norm(y, centred=True))


def cka_frame(outputs: dict[str, torch.Tensor], others: dict[str, dict[str, torch.Tensor] | str | os.PathLike],
              norms: dict[str, float] | None = None,
              other_norms: dict[str, dict[str, float]] | None = None) -> pl.DataFrame:
    """Each metric of `others` ({cka_final or cka_prev: the other checkpoint's outputs, or where `save_outputs` saved
    them}) for every layer and module: CKA of `outputs` with the other's, read one at a time onto each output's
    device; n_tokens is the tokens measured. `norms` ({key: `self_norm`} of `outputs`) and `other_norms` ({metric:
    {key: `self_norm`}}) are read where they hold a key and filled in where not, so that each output is centred
    once per call and its own norm computed once however often it is measured against."""
    from safetensors import safe_open

    norms = {} if norms is None else norms
    other_norms = {} if other_norms is None else other_norms
    rows = []
    with ExitStack() as stack:
        opened = {metric: other if isinstance(other, dict) else stack.enter_context(safe_open(Path(other), "pt"))
                  for metric, other in others.items()}
        for metric, saved in opened.items():
            if set(saved.keys()) != set(outputs):
                raise ValueError(f"the outputs {metric} is measured against are of other layers than these")
        for key, x in outputs.items():
            layer, module = key.split(".")
            x = _centred(x)
            if key not in norms:
                norms[key] = self_norm(x, centred=True)
            for metric, saved in opened.items():
                y = saved[key] if isinstance(saved, dict) else saved.get_tensor(key)
                if y.shape[0] != x.shape[0]:
                    raise ValueError(f"the outputs {metric} is measured against are of {y.shape[0]} tokens, these of "
                                     f"{x.shape[0]}")
                y = _centred(y, x.device)
                known = other_norms.setdefault(metric, {})
                if key not in known:
                    known[key] = self_norm(y, centred=True)
                rows.append((int(layer), module, metric, _cka(x, y, norms[key], known[key]), x.shape[0]))
    return pl.DataFrame(rows, schema=SCORE_SCHEMA, orient="row")
