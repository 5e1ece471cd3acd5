"""The calibration spec (where the text comes from, how many blocks of how many tokens, which seed) and the
set it gives: token-id sequences identified by a short hash of their ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import CalibrationError, ConfigError

DEFAULT_SPEC = "pydoc"
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class CalibrationSpec:
    """What calibration set to build."""

    source: str = DEFAULT_SPEC
    """``pydoc`` (Python's bundled documentation), a .txt or .jsonl(.gz/.zst) file, or ``hf:REPO[:CONFIG][:SPLIT]``."""
    samples: int = 64
    """Number of blocks drawn from text sources (pre-tokenized files are used whole)."""
    seq_len: int | None = None
    """Tokens per block for text sources; None: the model's positions, at most 512."""
    seed: int = 0
    """Seed of the block draw."""

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"samples must be at least 1, got {self.samples}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")


@dataclass(frozen=True)
class CalibrationSet:
    """A fixed list of token-id sequences and where they came from."""

    sequences: tuple[torch.Tensor, ...]
    """1-D int64 tensors of token ids."""
    source: str = ""
    """Human-readable origin, for reports."""
    id: str = field(init=False)
    """Short hash of the token ids: equal ids give equal hashes, whatever the source."""

    def __post_init__(self):
        if not self.sequences or any(len(s) == 0 for s in self.sequences):
            raise CalibrationError(f"calibration set {self.source!r} is empty or holds an empty sequence")
        digest = hashlib.sha256()
        for seq in self.sequences:
            digest.update(len(seq).to_bytes(8, "little"))
            digest.update(seq.to(torch.int64).numpy().tobytes())
        object.__setattr__(self, "id", digest.hexdigest()[:12])

    @classmethod
    def from_ids(cls, sequences: Sequence[Sequence[int]], source: str = "token ids") -> CalibrationSet:
        """A set from plain lists of token ids."""
        return cls(tuple(torch.as_tensor(list(s), dtype=torch.int64) for s in sequences), source)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def max_len(self) -> int:
        return max(len(s) for s in self.sequences)

    def describe(self) -> str:
        """What the set is, for people: its origin and its size."""
        return f"{self.source or 'token ids'}: {len(self.sequences)} sequences, {self.n_tokens:,} tokens"

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self.sequences) // batch_size)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if any token id falls outside ``[0, vocab_size)``."""
        low = min(int(s.min()) for s in self.sequences)
        high = max(int(s.max()) for s in self.sequences)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise CalibrationError(
                f"calibration {self.source!r} has token id {bad}, outside the model's vocabulary 0..{vocab_size - 1}"
            )

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Right-padded batches of (input_ids, attention_mask), longest sequences first."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        order = sorted(range(len(self.sequences)), key=lambda i: -len(self.sequences[i]))
        for start in range(0, len(order), batch_size):
            chunk = [self.sequences[i] for i in order[start : start + batch_size]]
            width = len(chunk[0])
            ids = torch.zeros(len(chunk), width, dtype=torch.int64)
            mask = torch.zeros(len(chunk), width, dtype=torch.int64)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            yield ids, mask


def fit_seq_len(spec: CalibrationSpec, max_positions: int | None = None) -> CalibrationSpec:
    """The spec with its block length settled: as given, else the model's positions, at most DEFAULT_SEQ_LEN."""
    if spec.seq_len is not None:
        return spec
    return replace(spec, seq_len=min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN))
