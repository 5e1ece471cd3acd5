"""From documents to calibration blocks: reading a spec's source, tokenizing, cutting and drawing."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path

from ..errors import CalibrationError
from .hub import HUB_POOL, HubTexts
from .local import (
    LOCAL_JSONL,
    READ_ERRORS,
    LocalTexts,
    TextFile,
    _has_text,
    _pieces,
    _token_list,
    _unreadable,
    pydoc_documents,
)
from .sets import DEFAULT_SPEC, CalibrationSet, CalibrationSpec, fit_seq_len

log = logging.getLogger(__name__)

def draw_limit(spec: CalibrationSpec) -> int | None:
    """The most blocks a spec's draw looks at: HUB_POOL per sample for a Hub dataset; None (all) for the rest."""
    return HUB_POOL * spec.samples if spec.source.startswith("hf:") else None


def read_source(spec: str) -> Iterable[str | TextFile] | list[list[int]]:
    """Documents (strings; for a Hub dataset, read as they are iterated) or, for pre-tokenized jsonl, token-id
    lists, named by a spec."""
    if spec == DEFAULT_SPEC:
        return pydoc_documents()
    if spec.startswith("hf:"):
        return HubTexts(spec)
    path = Path(spec)
    if not path.is_file():
        raise CalibrationError(
            f"calibration source {spec!r} is not a file; use 'pydoc', a .txt, .jsonl, .jsonl.gz or .jsonl.zst path, or hf:REPO"
        )
    try:
        if path.name.endswith(LOCAL_JSONL):
            texts = LocalTexts(path)
            with closing(texts.records()) as records:
                first = next(records, None)
            if first is not None and "input_ids" in first:  # token ids are taken verbatim, every one of them
                return [_token_list(r.get("input_ids"), path, n) for n, r in enumerate(texts.records(), 1)]
            return texts
        return [TextFile(path)]
    except CalibrationError:
        raise
    except READ_ERRORS as err:  # bad UTF-8, a damaged gzip or zstd stream
        raise _unreadable(spec, err) from err


def token_pieces(documents: Iterable[str | TextFile], tokenizer) -> Iterator[list[int]]:
    """The token stream in pieces: each document tokenized without special tokens (a long one piece by piece) and
    followed by EOS. Memory holds one piece at a time."""
    eos = getattr(tokenizer, "eos_token_id", None)
    for number, document in enumerate(documents):
        if eos is None and number == 1:
            raise CalibrationError(
                "the tokenizer has no EOS token to end each of the documents with, so they would run together; "
                "give one document (a .txt file) or a pre-tokenized jsonl ({\"input_ids\": [...]} per line)"
            )
        for piece in _pieces(document):
            yield tokenizer(piece, add_special_tokens=False)["input_ids"]
        if eos is not None:
            yield [eos]


def token_stream(documents: Iterable[str], tokenizer) -> list[int]:
    """Documents tokenized without special tokens and joined with EOS (`token_pieces`, in one list)."""
    return [token for piece in token_pieces(documents, tokenizer) for token in piece]


def stream_blocks(documents: Iterable[str], tokenizer, width: int,
                  limit: int | None = None) -> tuple[int, Callable[[Sequence[int]], list[list[int]]]]:
    """How many whole blocks of `width` tokens the token stream holds (at most `limit`: the first pass stops
    there), and a function that returns the blocks at given indices, in index order: two passes over the
    documents, memory for one piece and the blocks taken; each pass reads only as far as it needs."""
    total = 0
    for piece in token_pieces(documents, tokenizer):
        total += len(piece)
        if limit is not None and total >= limit * width:
            break

    def take(indices: Sequence[int]) -> list[list[int]]:
        wanted = sorted(indices)
        blocks, current, offset, k = [], [], 0, 0
        for piece in token_pieces(documents, tokenizer):
            while k < len(wanted):
                start, end = wanted[k] * width, (wanted[k] + 1) * width
                if start >= offset + len(piece):
                    break
                low, high = max(start, offset) - offset, min(end, offset + len(piece)) - offset
                current += piece[low:high]
                if end > offset + len(piece):
                    break  # the block goes on in the next piece
                blocks.append(current)
                current, k = [], k + 1
            offset += len(piece)
            if k == len(wanted):
                break
        return blocks

    return total // width if limit is None else min(total // width, limit), take


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] where the tokenizer's template puts BOS before a text (as in training), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos and ids != tokenizer("a", add_special_tokens=False)["input_ids"] else []


def _spec_blocks(documents: Iterable[str], tokenizer,
                 spec: CalibrationSpec) -> tuple[int, Callable[[Sequence[int]], list[list[int]]]]:
    """`stream_blocks` for a spec with its seq_len settled: blocks of seq_len tokens, each after BOS where the
    tokenizer's template puts one, from the first `draw_limit` blocks of the stream."""
    prefix = bos_prefix(tokenizer)
    n_blocks, take = stream_blocks(documents, tokenizer, spec.seq_len - len(prefix), draw_limit(spec))
    return n_blocks, lambda indices: [prefix + block for block in take(indices)]


def drawn_blocks(n_blocks: int, samples: int, seed: int) -> list[int]:
    """The indices of the blocks a calibration set with this seed takes, in stream order."""
    return sorted(random.Random(seed).sample(range(n_blocks), min(samples, n_blocks)))


def tokenize_blocks(documents: Iterable[str], tokenizer, spec: CalibrationSpec) -> list[list[int]]:
    """Join documents with EOS, cut into ``seq_len`` blocks, and draw ``samples`` of them with ``seed`` (from the
    first `draw_limit` blocks)."""
    spec = fit_seq_len(spec)
    n_blocks, take = _spec_blocks(documents, tokenizer, spec)
    if n_blocks == 0:
        raise CalibrationError(
            f"calibration {spec.source!r} gives fewer than one block of seq_len={spec.seq_len} tokens"
        )
    if n_blocks < spec.samples:
        log.warning(
            "calibration %r holds %d blocks of %d tokens; using all of them instead of %d",
            spec.source, n_blocks, spec.seq_len, spec.samples,
        )
    return take(drawn_blocks(n_blocks, spec.samples, spec.seed))


def heldout_set(spec: CalibrationSpec, tokenizer, samples: int = 32) -> CalibrationSet:
    """Blocks of the same text that the calibration set `spec` does not take: disjoint from it by construction."""
    spec = fit_seq_len(spec)
    docs = read_source(spec.source)
    if isinstance(next(iter(docs), ""), list):
        raise CalibrationError(f"held-out blocks need a text source; {spec.source!r} is pre-tokenized")
    n_blocks, take = _spec_blocks(docs, tokenizer, spec)
    taken = set(drawn_blocks(n_blocks, spec.samples, spec.seed))
    rest = [i for i in range(n_blocks) if i not in taken]
    if not rest:
        raise CalibrationError(f"{spec.source!r} has no blocks left beyond the {len(taken)} the calibration set takes")
    chosen = sorted(random.Random(spec.seed + 1).sample(rest, min(samples, len(rest))))
    blocks = take(chosen)
    return CalibrationSet.from_ids(blocks, f"{spec.source} held out ({len(blocks)}x{spec.seq_len})")


def load_calibration(spec: CalibrationSpec | str, tokenizer=None) -> CalibrationSet:
    """Build the calibration set a spec names; text sources need the model's tokenizer. Raises `CalibrationError`
    for a source that cannot be read or gives no block."""
    if isinstance(spec, str):
        spec = CalibrationSpec(spec)
    docs = read_source(spec.source)
    first = next(iter(docs), None)
    if first is None:
        raise CalibrationError(f"calibration source {spec.source!r} is empty")
    if isinstance(first, list):  # pre-tokenized: verbatim
        return CalibrationSet.from_ids(docs, spec.source)
    if not any(_has_text(d) for d in docs):
        raise CalibrationError(f"calibration source {spec.source!r} holds no text")
    if tokenizer is None:
        raise CalibrationError(
            f"calibration {spec.source!r} is text, but the model has no tokenizer; "
            'give a pre-tokenized jsonl ({"input_ids": [...]} per line)'
        )
    blocks = tokenize_blocks(docs, tokenizer, spec)
    bos = ", each after BOS" if bos_prefix(tokenizer) else ""
    label = f"{spec.source} ({len(blocks)}x{fit_seq_len(spec).seq_len}{bos}, seed {spec.seed})"
    return CalibrationSet.from_ids(blocks, label)
