"""Losses: what removing a module costs (`ablation_loss`, the ground truth) and perplexity, from next-token
cross-entropy summed in float64 and computed a chunk of positions at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.blocks import heldout_set, load_calibration
from ..calibration.sets import CalibrationSet, CalibrationSpec, fit_seq_len
from ..errors import CalibrationError, ConfigError
from ..microsuite.suite import heldout_set as suite_heldout_set
from ..model.adapters import ResidualLayout, locate
from ..store import MODULES
from .metrics import ABLATION, SCORE_SCHEMA, execution_device, model_device


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


LOGITS_CHUNK_BYTES = 256 * 2**20
"""The float32 logits computed at once by `next_token_losses`: a chunk of positions, whatever the vocabulary."""


def next_token_losses(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy [B, T-1] (0 where the target is padding), from the decoder's hidden
    states and the LM head applied to a chunk of positions at a time in float32 (with the final logit soft-capping of
    the families that have it), so that full [B, T, vocab] logits never exist: at a 262,144-token vocabulary they would
    take 4 GiB for 8 x 512 tokens."""
    base, head = getattr(model, "base_model", model), model.get_output_embeddings()
    if base is model or head is None:  # no separate decoder and head to call: the whole model, logits and all
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        return nll * attention_mask[:, 1:].to(nll.dtype)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    batch, length = input_ids.shape
    step = max(1, LOGITS_CHUNK_BYTES // (4 * batch * head.out_features))
    pieces = []
    device = execution_device(head)  # the head may sit on another device than the last layer
    hidden, targets = hidden.to(device), input_ids.to(device)
    for start in range(0, length - 1, step):
        end = min(start + step, length - 1)
        logits = head(hidden[:, start:end]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        pieces.append(F.cross_entropy(logits.transpose(1, 2), targets[:, start + 1:end + 1], reduction="none"))
    nll = torch.cat(pieces, dim=1) if pieces else hidden.new_zeros(batch, 0, dtype=torch.float32)
    return nll * attention_mask[:, 1:].to(nll)  # right padding: a real target has a real context


class LossSums:
    """Summed next-token cross-entropy over the predicted tokens, in float64, batch by batch."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.total += float(next_token_losses(model, input_ids, attention_mask).sum(dtype=torch.float64))
        self.count += int(attention_mask[:, 1:].sum())

    def mean(self) -> float:
        return self.total / self.count


def position_buckets(length: int) -> list[tuple[int, int]]:
    """The position buckets of sequences of `length` tokens: (first, last) of 1, 2-4, 5-16, 17-64, ... (each up to
    the next power of 4), the last one ending at the last position that predicts a token, `length` - 1."""
    buckets, low, high = [], 1, 1
    while low <= length - 1:
        buckets.append((low, min(high, length - 1)))
        low, high = high + 1, high * 4
    return buckets


@torch.inference_mode()
def position_losses(model, data: CalibrationSet, batch_size: int = 8) -> list[tuple[int, int, float, int]]:
    """The mean next-token loss (nats) by position: for each bucket of `position_buckets`, (first, last, mean loss,
    tokens) over the predicted tokens whose context is that many tokens long (position p predicts token p + 1).
    Buckets that no token reaches are left out."""
    device = model_device(model)
    data.check_vocab(model.get_input_embeddings().num_embeddings)
    buckets = position_buckets(data.max_len)
    edges = torch.tensor([high for _, high in buckets], device=device)
    sums = torch.zeros(len(buckets), dtype=torch.float64, device=device)
    counts = torch.zeros(len(buckets), dtype=torch.int64, device=device)
    for ids, mask in data.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        nll = next_token_losses(model, ids, mask)  # [B, T - 1], 0 where the target is padding
        # Right padding: column j predicts from j + 1 tokens in every row.
        which = torch.bucketize(torch.arange(1, ids.shape[1], device=device), edges)
        sums.index_add_(0, which, nll.sum(dim=0, dtype=torch.float64))
        counts.index_add_(0, which, mask[:, 1:].sum(dim=0))
    if int(counts.sum()) == 0:
        raise CalibrationError(f"data {data.source!r} has no token to predict: every sequence needs 2 tokens or more")
    return [(low, high, float(total / n), int(n)) for (low, high), total, n in zip(buckets, sums.cpu(), counts.cpu())
            if n > 0]


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
                        loss.update(model, input_ids, attention_mask)
                    bar.update()
    finally:
        bar.close()
        model.train(was_training)
    intact = sums[None].mean()
    rows = [(layer, module, ABLATION, sums[(layer, module)].mean() - intact, sums[None].count) for layer, module in cells]
    return pl.DataFrame(rows, schema=SCORE_SCHEMA, orient="row")


@torch.inference_mode()
def perplexity(model, data: CalibrationSet, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every predicted token, and the number of those tokens; memory does
    not grow with the vocabulary beyond the model's own (`ckpt_trace.scoring.loss.next_token_losses`)."""
    device = model_device(model)
    data.check_vocab(model.get_input_embeddings().num_embeddings)
    sums = LossSums()
    for ids, mask in data.batches(batch_size):
        sums.update(model, ids.to(device), mask.to(device))
    if sums.count == 0:
        raise CalibrationError(f"perplexity data {data.source!r} has no token to predict: every sequence needs 2 tokens or more")
    return math.exp(sums.mean()), sums.count


def perplexity_set(model_dir: Path, model, tokenizer, calibration: CalibrationSpec,
                   perplexity_data: str | None = None) -> CalibrationSet:
    """The text a model's perplexity is measured on: `perplexity_data` (any calibration spec) when given; else, for a
    micro-suite model, the documents its suite held out from training; else blocks of the calibration text that
    the calibration set does not take."""
    from ..model.loading import max_positions

    spec = fit_seq_len(calibration, max_positions(model.config.to_dict()))
    if perplexity_data:
        return load_calibration(replace(spec, source=perplexity_data), tokenizer)
    if tokenizer is None:
        raise ConfigError(f"{str(model_dir)!r} has no tokenizer; give --perplexity-data with a pre-tokenized jsonl")
    return suite_heldout_set(model_dir, tokenizer) or heldout_set(spec, tokenizer)
