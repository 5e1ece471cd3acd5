"""Score every layer of a model in one hooked forward pass.

For decoder layer l with input residual stream x, the attention delta a and the MLP
delta m (what each adds to the residual stream), and output y:

    sequential / post-norm:  h = x + a;  y = h + m
    parallel:                y = x + a + m   (both branches read x)

`importance` is 1 - cos(in, in + delta) and `update_ratio` is ||delta|| / ||in||, for
the block (in = x, delta = y - x, taken as a + m), the attention (in = x, delta = a) and the MLP
(in = h, or x when parallel; delta = m). Each is a token-weighted mean over the real
(non-padding) calibration tokens, computed in float32 and summed in float64, so memory
does not grow with the calibration set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ResidualLayout, locate
from .calibration import CalibrationSet

MODULES = ("block", "attention", "mlp")
METRICS = ("importance", "update_ratio")
"""What one hooked pass gives, for every layer and module."""
ABLATION = "ablation_loss"
"""The ground truth, at one more forward pass per layer and module (see `ablation_losses`)."""
ALL_METRICS = (*METRICS, ABLATION)
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


class ResidualStats:
    """Streaming token-weighted means of every metric, per layer and module, in constant memory."""

    def __init__(self, n_layers: int, device: torch.device | str = "cpu"):
        # [layer, module, metric] sums of per-token values, weighted by the token mask.
        self.sums = torch.zeros(n_layers, len(MODULES), len(METRICS), dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.weight: torch.Tensor | None = None

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """Set the token weights (1 real, 0 padding) of the batch about to run."""
        self.weight = attention_mask.to(torch.float32)
        self.n_tokens += int(attention_mask.sum())

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
        values = torch.stack((importance, ratio), dim=-1) * self.weight.unsqueeze(-1)  # [B, T, 2]
        self.sums[layer, module] += values.sum(dim=(0, 1), dtype=torch.float64)

    def compute(self) -> torch.Tensor:
        """The means so far, shape [layer, module, metric], float64 on the CPU."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were scored")
        return (self.sums / self.n_tokens).cpu()

    def frame(self) -> pl.DataFrame:
        """The means as a long polars frame: layer, module, metric, value, n_tokens."""
        means = self.compute()
        n_layers = means.shape[0]
        rows = [
            (layer, module, metric, float(means[layer, i, j]), self.n_tokens)
            for layer in range(n_layers)
            for i, module in enumerate(MODULES)
            for j, metric in enumerate(METRICS)
        ]
        return pl.DataFrame(rows, schema=SCORE_SCHEMA, orient="row")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _keep_input(cache: dict, module, args, kwargs):
    cache["x"] = args[0] if args else kwargs["hidden_states"]


def _keep_output(cache: dict, key: str, module, args, output):
    cache[key] = _first(output)


def _measure(cache: dict, layer: int, parallel: bool, stats: ResidualStats, module, args, output):
    # float32 views of the model's activations (no copy when the model is float32)
    x, a, m = (t.float() for t in (cache.pop("x"), cache.pop("a"), cache.pop("m")))
    xx = torch.linalg.vecdot(x, x)  # block and attention read the same input
    # The block delta y - x is a + m, summed here in float32: in bfloat16, y and x are each rounded at the scale
    # of the residual stream, so their difference loses percents where the update is small.
    stats.update(layer, 0, x, a + m, xx)
    stats.update(layer, 1, x, a, xx)
    stats.update(layer, 2, x if parallel else x + a, m)


@contextmanager
def residual_taps(layout: ResidualLayout, stats: ResidualStats) -> Iterator[None]:
    """Hook every layer so that each forward pass feeds `stats`; hooks go away on exit, even on error."""
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
                taps.block.register_forward_hook(partial(_measure, cache, index, layout.parallel, stats)),
            ]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for cache in caches:
            cache.clear()


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def score(
    model: nn.Module,
    calibration: CalibrationSet,
    batch_size: int = 8,
    progress: bool | str = False,
) -> pl.DataFrame:
    """Importance and update ratio of every block, attention and MLP layer, from one forward pass per batch.

    Returns a long frame with columns layer, module, metric, value, n_tokens. The model
    runs in eval mode under inference mode, and its training mode is restored afterwards.
    `progress` shows a bar over batches; a string becomes its label.
    """
    layout = locate(model)
    calibration.check_vocab(model.get_input_embeddings().num_embeddings)
    device = model_device(model)
    stats = ResidualStats(len(layout.layers), device)
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
        with torch.inference_mode(), residual_taps(layout, stats):
            for input_ids, attention_mask in bar:
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                stats.begin_batch(attention_mask)
                base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        bar.close()
        model.train(was_training)
    return stats.frame()


# -- the ground truth: what removing a module costs ------------------------------------

def _returns_input(module, args, kwargs, output):
    return args[0] if args else kwargs["hidden_states"]


def _returns_zero(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@contextmanager
def removed(layout: ResidualLayout, layer: int, module: str) -> Iterator[None]:
    """One module's delta removed by a hook: attention a = 0, MLP m = 0, or the block's output = its input."""
    taps = layout.layers[layer]
    if module == "block":
        handle = taps.block.register_forward_hook(_returns_input, with_kwargs=True)
    else:
        handle = (taps.attention if module == "attention" else taps.mlp).register_forward_hook(_returns_zero)
    try:
        yield
    finally:
        handle.remove()


class LossSums:
    """Summed next-token cross-entropy over the predicted tokens, in float64, batch by batch."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
        predicted = attention_mask[:, 1:].to(nll.dtype)  # right padding: a real target has a real context
        self.total += float((nll * predicted).sum(dtype=torch.float64))
        self.count += int(predicted.sum())

    def mean(self) -> float:
        return self.total / self.count


def ablation_losses(model: nn.Module, calibration: CalibrationSet, batch_size: int = 8,
                    progress: bool | str = False) -> pl.DataFrame:
    """`ablation_loss` of every layer and module: the mean next-token loss (nats per predicted token, every
    position whose next token is real) with that module's delta removed, minus the intact model's, on the
    same tokens. One forward pass of the whole model per batch, layer and module, plus one intact."""
    layout = locate(model)
    calibration.check_vocab(model.get_input_embeddings().num_embeddings)
    device = model_device(model)
    cells = [(layer, module) for layer in range(len(layout.layers)) for module in MODULES]
    sums = {cell: LossSums() for cell in [None, *cells]}
    bar = tqdm(total=calibration.n_batches(batch_size) * len(sums), desc=progress if isinstance(progress, str) else
               "ablation", unit="pass", disable=None if progress else True, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in calibration.batches(batch_size):
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                for cell, loss in sums.items():
                    with removed(layout, *cell) if cell else nullcontext():
                        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                    loss.update(logits, input_ids, attention_mask)
                    bar.update()
    finally:
        bar.close()
        model.train(was_training)
    intact = sums[None].mean()
    rows = [(layer, module, ABLATION, sums[(layer, module)].mean() - intact, sums[None].count) for layer, module in cells]
    return pl.DataFrame(rows, schema=SCORE_SCHEMA, orient="row")
