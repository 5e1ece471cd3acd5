"""Revision names of checkpoint suites, parsed into training order.

Training order is by stage, then step, then tokens, never by name: ``step1000`` comes
after ``step512``, and OLMo-2's ``stage2-...-step11931`` after every ``stage1-...``.
A name that fits no known scheme is kept and sorted last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCALE = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9, "t": 10**12, "T": 10**12}

_NUMBER = r"(\d+(?:\.\d+)?)([kKmMbBtT]?)"
_PATTERNS = [
    # OLMo-2: stage1-step{N}-tokens{T}B, stage2-ingredient{k}-step{N}-tokens{T}B
    re.compile(rf"^stage(?P<stage>\d+)(?:-ingredient(?P<ingredient>\d+))?-step{_NUMBER}(?:-tokens?{_NUMBER})?$"),
    # Pythia step{N}; OLMo-1 step{N}-tokens{T}B; SmolLM2 step-{N}; TinyLlama step-480k-token-1007B
    re.compile(rf"^step-?{_NUMBER}(?:-tokens?-?{_NUMBER})?$"),
    # LLM360 Amber ckpt_{N}; stanford-crfm checkpoint-{N}
    re.compile(rf"^(?:ckpt_|checkpoint-){_NUMBER}$"),
]


def _number(value: str | None, suffix: str | None) -> int | None:
    if value is None:
        return None
    return round(float(value) * _SCALE[suffix or ""])


@dataclass(frozen=True)
class Revision:
    """One checkpoint's name and what its name says about where it sits in training."""

    name: str
    step: int | None = None
    tokens: int | None = None
    stage: int | None = None
    ingredient: int | None = None
    commit: str | None = None

    @property
    def parsed(self) -> bool:
        return self.step is not None

    def sort_key(self) -> tuple:
        """Training order: parsed names by stage, step, tokens; `main` after them; unknown names last."""
        if not self.parsed:
            return (1 if self.name == "main" else 2, 0, 0, 0, self.name)
        return (0, self.stage or 1, self.step, self.tokens or 0, self.name)


def parse_revision(name: str, tokens_per_step: int | None = None, commit: str | None = None) -> Revision:
    """Parse a revision name; `tokens_per_step` fills in tokens where the name has none."""
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if not match:
            continue
        groups = match.groups()
        named = match.groupdict()
        offset = 2 if "stage" in named else 0
        step = _number(groups[offset], groups[offset + 1])
        tokens = _number(groups[offset + 2], groups[offset + 3]) if len(groups) > offset + 2 else None
        if tokens is None and tokens_per_step is not None:
            tokens = step * tokens_per_step
        stage = int(named["stage"]) if named.get("stage") else None
        ingredient = int(named["ingredient"]) if named.get("ingredient") else None
        return Revision(name, step, tokens, stage, ingredient, commit)
    return Revision(name, commit=commit)


def training_order(revisions: list[Revision]) -> list[Revision]:
    """Revisions sorted in training order."""
    return sorted(revisions, key=Revision.sort_key)
