"""Score every layer of a model in one hooked forward pass.

For decoder layer l with input residual stream x, the attention delta a and the MLP
delta m (what each adds to the residual stream), and output y:

    sequential / post-norm:  h = x + a;  y = h + m
    parallel:                y = x + a + m   (both branches read x)

For the block (in = x, delta = y - x, taken as a + m), the attention (in = x, delta = a) and
the MLP (in = h, or x when parallel; delta = m), with out = in + delta:

    importance        1 - cos(in, out)                  (He et al.)
    update_ratio      ||delta|| / ||in||
    angular_distance  arccos(cos(in, out)) / pi          (Gromov et al.)

and `span_distance` of n blocks from layer l: the angular distance between the input of
layer l and the input of layer l + n (the last layer's output for l + n = L), for n = 1 ..
`MAX_SPAN`, stored as module `span<n>`: the score that picks a contiguous run of blocks to
remove. Each is a token-weighted mean over the real (non-padding) calibration tokens, and
its `_last` variant the mean over each sequence's last real token only; computed in
float32 and summed in float64, so memory does not grow with the calibration set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sets import CalibrationSet
from ..model.adapters import ResidualLayout, locate
from ..store import METRICS, MODULES, span_module

PASS_METRICS = (*METRICS, "angular_distance")
"""Per layer and module, from the one hooked pass."""
SPAN = "span_distance"
MAX_SPAN = 8
"""Spans of up to this many blocks (and no more than the model has)."""
LAST = "_last"
"""Suffix of a metric's variant over each sequence's last real token (`--tokens last`)."""
CHEAP = (*PASS_METRICS, SPAN)
ABLATION = "ablation_loss"
"""The ground truth, at one more forward pass per layer and module (see `ablation_losses`)."""
WEIGHT_METRICS = ("weight_norm", "weight_change_final", "weight_change_prev")
"""Read from the weight files (`ckpt_trace.scoring.weights`)."""
CKA_METRICS = ("cka_final", "cka_prev")
"""From outputs kept during the pass (`ckpt_trace.scoring.representations`)."""
DYNAMICS = (*WEIGHT_METRICS, *CKA_METRICS)
"""Training dynamics: each `_final` metric is measured against the scan's reference checkpoint, each `_prev` against
the line's checkpoint before."""
ALL_METRICS = (*CHEAP, *(m + LAST for m in CHEAP), ABLATION, *DYNAMICS)
SCORER_VERSION = 2
"""Bumped whenever the same weights, dtype and calibration would score differently (2: block delta as a + m)."""

SCORE_SCHEMA = {
    "layer": pl.Int32,
    "module": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "n_tokens": pl.Int64,
}

_EPS = 1e-12
WEIGHTINGS = ("", LAST)
"""Every real token, and each sequence's last real token."""


def _angular(ii: torch.Tensor, dd: torch.Tensor, i_d: torch.Tensor) -> torch.Tensor:
    """arccos(cos(in, in + d)) / pi from |in|^2, |d|^2 and in . d, as atan2(|in x d|, in . out): accurate at small
    angles, where arccos of a cosine near 1 is not."""
    cross = (ii * dd - i_d.square()).clamp_min(0).sqrt()
    return torch.atan2(cross, ii + i_d) / math.pi


class ResidualStats:
    """Streaming token-weighted means of every metric, per layer and module, in constant memory."""

    def __init__(self, n_layers: int, spans: bool | str = False):
        self.n_layers = n_layers
        self.spans = spans
        """False: no spans; "last": over each sequence's last token only, keeping only those rows of the stream;
        True: both token sets."""
        # Per device (a model split over devices adds each layer's values where the layer runs; `compute` combines):
        # [layer, module, metric, weighting] sums of per-token values, weighted by the token weights, and
        # [layer, n - 1, weighting] sums for the span of n blocks from each layer.
        self.parts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts = [0, 0]  # real tokens, sequences
        self.weight: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self._batch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # the weights and last on each device
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_tokens(self) -> int:
        return self.counts[0]

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """Set the token weights (every real token; each row's last real token) of the batch about to run."""
        mask = attention_mask.to(torch.float32)
        lengths = attention_mask.sum(dim=1).long()
        positions = torch.arange(mask.shape[1], device=mask.device)
        self.last = (mask * (positions + 1)).argmax(dim=1)  # the last real position, whichever side is padded
        last = torch.nn.functional.one_hot(self.last, mask.shape[1]).to(mask) * (lengths > 0)[:, None]
        self.weight = torch.stack((mask, last))  # [2, B, T]
        self._batch = {self.weight.device: (self.weight, self.last)}
        self.counts[0] += int(lengths.sum())
        self.counts[1] += int((lengths > 0).sum())
        self.inputs.clear()

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sums, span sums, token weights and last positions on `device`."""
        if device not in self.parts:
            self.parts[device] = (
                torch.zeros(self.n_layers, len(MODULES), len(PASS_METRICS), len(WEIGHTINGS), dtype=torch.float64,
                            device=device),
                torch.zeros(self.n_layers, MAX_SPAN, len(WEIGHTINGS), dtype=torch.float64, device=device))
        if device not in self._batch:
            self._batch[device] = (self.weight.to(device), self.last.to(device))
        return (*self.parts[device], *self._batch[device])

    @staticmethod
    def _add(target: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> None:
        """Add per-token values [B, T, k] to target [k, 2], under both weightings, summed in float64."""
        target += (values.unsqueeze(0) * weight.unsqueeze(-1)).sum(dim=(1, 2), dtype=torch.float64).T

    def update(
        self, layer: int, module: int, inp: torch.Tensor, delta: torch.Tensor, inp_sq: torch.Tensor | None = None
    ) -> None:
        """Add one module's per-token metrics for the current batch, where out = inp + delta.

        `inp_sq`, the per-token squared norm of `inp`, may be passed when it is already known.
        """
        assert self.weight is not None, "begin_batch() must come before update()"
        inp, delta = inp.float(), delta.float()  # no copy when already float32
        ii = torch.linalg.vecdot(inp, inp) if inp_sq is None else inp_sq  # [B, T]
        dd = torch.linalg.vecdot(delta, delta)
        i_d = torch.linalg.vecdot(inp, delta)
        in_out = ii + i_d  # in . out
        norms = (ii * (ii + 2 * i_d + dd).clamp_min(0)).sqrt()  # |in| |out|
        cos = in_out / norms.clamp_min(_EPS)
        # 1 - cos = (|in|^2 |d|^2 - (in . d)^2) / (|in| |out| (|in| |out| + in . out)): no cancellation when cos is
        # near 1, where the late layers of large models sit, and exactly 0 for a zero delta.
        near = (ii * dd - i_d.square()).clamp_min(0) / (norms * (norms + in_out)).clamp_min(_EPS)
        importance = torch.where(cos > 0, near, 1.0 - cos)
        ratio = (dd / ii.clamp_min(_EPS)).sqrt()
        sums, _, weight, _ = self._on(inp.device)
        self._add(sums[layer, module], torch.stack((importance, ratio, _angular(ii, dd, i_d)), dim=-1), weight)

    def arrive(self, layer: int, x: torch.Tensor, xx: torch.Tensor | None = None) -> None:
        """The residual stream entering layer `layer` (the last layer's output for `layer` = L): add the span
        distances from the inputs of the up to `MAX_SPAN` layers before it."""
        if not self.spans:
            return
        _, span_sums, weight, last = self._on(x.device)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.spans == "last":  # only the last real token of each row is needed: keep [B, D], not [B, T, D]
            x, xx = x[rows, last].float(), None
        else:
            x = x.float()
        xx = torch.linalg.vecdot(x, x) if xx is None else xx
        for n in range(1, MAX_SPAN + 1):
            if (earlier := self.inputs.get(layer - n)) is not None:
                u, uu = (t.to(x.device) for t in earlier)  # an earlier layer may run on another device
                d = x - u
                angle = _angular(uu, torch.linalg.vecdot(d, d), torch.linalg.vecdot(u, d))
                if self.spans == "last":  # [B]: the last-token weighting only
                    span_sums[layer - n, n - 1, 1] += (angle * weight[1, rows, last]).sum(dtype=torch.float64)
                else:
                    self._add(span_sums[layer - n, n - 1].unsqueeze(0), angle.unsqueeze(-1), weight)
        self.inputs.pop(layer - MAX_SPAN, None)
        if layer < self.n_layers:
            self.inputs[layer] = (x, xx)
        else:  # the last layer's output: nothing more to measure against this batch's stream
            self.inputs.clear()

    def compute(self) -> torch.Tensor:
        """The means so far, shape [layer, module, metric, weighting], float64 on the CPU."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were scored")
        return self._combined(0) / torch.tensor(self.counts, dtype=torch.float64)

    def _combined(self, which: int) -> torch.Tensor:
        """The sums (0) or span sums (1) of every device, added on the CPU."""
        return sum((part[which].cpu() for part in self.parts.values()),
                   torch.zeros(self.n_layers, *((len(MODULES), len(PASS_METRICS)) if which == 0 else (MAX_SPAN,)),
                               len(WEIGHTINGS), dtype=torch.float64))

    def frame(self, metrics: tuple[str, ...] = METRICS) -> pl.DataFrame:
        """The means of `metrics` as a long polars frame: layer, module, metric, value, n_tokens (the tokens
        averaged over: every real token, or one per sequence for a `_last` metric)."""
        means = self.compute()
        spans = self._combined(1) / torch.tensor(self.counts, dtype=torch.float64)
        rows = []
        for w, suffix in enumerate(WEIGHTINGS):
            for j, metric in enumerate(PASS_METRICS):
                if metric + suffix in metrics:
                    rows += [(layer, module, metric + suffix, float(means[layer, i, j, w]), self.counts[w])
                             for layer in range(self.n_layers) for i, module in enumerate(MODULES)]
            if SPAN + suffix in metrics:
                if not self.spans or (self.spans == "last" and not suffix):
                    raise ValueError(f"{SPAN + suffix} needs ResidualStats(..., spans={'True' if not suffix else 'last'})")
                rows += [(layer, span_module(n), SPAN + suffix, float(spans[layer, n - 1, w]), self.counts[w])
                         for n in range(1, min(MAX_SPAN, self.n_layers) + 1) for layer in range(self.n_layers - n + 1)]
        return pl.DataFrame(rows, schema=SCORE_SCHEMA, orient="row")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _keep_input(cache: dict, module, args, kwargs):
    cache["x"] = args[0] if args else kwargs["hidden_states"]


def _keep_output(cache: dict, key: str, module, args, output):
    cache[key] = _first(output)


def _measure(cache: dict, layer: int, parallel: bool, stats: ResidualStats, last: bool, sample, module, args, output):
    if sample is not None:  # the outputs as the model computed them, in its dtype
        sample.take(layer, _first(output), cache["a"], cache["m"])
    # float32 views of the model's activations (no copy when the model is float32)
    # accelerate moves a layer's input to its device inside forward, after the pre-hook took it: move it here too
    x, a, m = (t.float() for t in (cache.pop("x").to(cache["a"].device), cache.pop("a"), cache.pop("m")))
    xx = torch.linalg.vecdot(x, x)  # block and attention read the same input
    stats.arrive(layer, x, xx)
    if last:
        stats.arrive(layer + 1, _first(output))
    # The block delta y - x is a + m, summed here in float32: in bfloat16, y and x are each rounded at the scale
    # of the residual stream, so their difference loses percents where the update is small.
    stats.update(layer, 0, x, a + m, xx)
    stats.update(layer, 1, x, a, xx)
    stats.update(layer, 2, x if parallel else x + a, m)


@contextmanager
def residual_taps(layout: ResidualLayout, stats: ResidualStats, sample=None) -> Iterator[None]:
    """Hook every layer so that each forward pass feeds `stats` (and `sample`, an `OutputSample`, where given); hooks
    go away on exit, even on error."""
    handles = []
    caches: list[dict] = []
    try:
        for index, taps in enumerate(layout.layers):
            cache: dict = {}
            caches.append(cache)
            handles += [
                taps.block.register_forward_pre_hook(partial(_keep_input, cache), with_kwargs=True),
                taps.attention.register_forward_hook(partial(_keep_output, cache, "a")),
                taps.mlp.register_forward_hook(partial(_keep_output, cache, "m")),
                taps.block.register_forward_hook(
                    partial(_measure, cache, index, layout.parallel, stats, index == len(layout.layers) - 1, sample)),
            ]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for cache in caches:
            cache.clear()


def model_device(model: nn.Module) -> torch.device:
    """Where a model's input goes: the device of its input embeddings (of its first parameter, for a model split
    over devices by a device map, may be another)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings) if embeddings is not None else next(model.parameters()).device


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: its accelerate hook's device when a device map placed it (weights offloaded to the
    CPU sit on `meta` between calls), else its weight's."""
    hooked = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(hooked) if hooked is not None else module.weight.device


def score(
    model: nn.Module,
    calibration: CalibrationSet,
    batch_size: int = 8,
    progress: bool | str = False,
    metrics: tuple[str, ...] = METRICS,
    sample=None,
) -> pl.DataFrame:
    """The one-pass `metrics` (any of `CHEAP` and their `_last` variants; ablation_loss is left to
    `ablation_losses`) of every block, attention and MLP layer, from one forward pass per batch; with `sample` (an
    `ckpt_trace.scoring.representations.OutputSample`), each module's outputs at its tokens are kept too.

    Returns a long frame with columns layer, module, metric, value, n_tokens. The model
    runs in eval mode under inference mode, and its training mode is restored afterwards.
    `progress` shows a bar over batches; a string becomes its label.
    """
    layout = locate(model)
    calibration.check_vocab(model.get_input_embeddings().num_embeddings)
    device = model_device(model)
    spans = SPAN in metrics or (SPAN + LAST in metrics and "last")  # every token, or the last token's rows only
    stats = ResidualStats(len(layout.layers), spans=spans)
    # The scores need only the decoder layers, so the LM head (often the largest matmul) is skipped.
    base = getattr(model, "base_model", model)
    batches = calibration.batches(batch_size)
    bar = tqdm(
        batches,
        total=calibration.n_batches(batch_size),
        desc=progress if isinstance(progress, str) else "scoring",
        unit="batch",
        disable=None if progress else True,  # None: no bar when stderr is not a terminal
        leave=False,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), residual_taps(layout, stats, sample):
            for input_ids, attention_mask in bar:
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                stats.begin_batch(attention_mask)
                if sample is not None:
                    sample.begin_batch(attention_mask)
                base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        bar.close()
        model.train(was_training)
    return stats.frame(metrics)
