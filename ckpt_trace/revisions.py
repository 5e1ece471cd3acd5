"""Revision names of checkpoint suites, parsed into training order.

Training order is by stage, then step, then tokens, never by name: ``step1000`` comes
after ``step512``, and OLMo-2's ``stage2-...-step11931`` after every ``stage1-...``.
A name that fits no known scheme is kept and sorted last.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import SelectionError

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


SELECT_HELP = (
    "comma-separated terms: all, a revision name (main, step1000), a step range A..B (step1000..step20000, "
    "..5000, 1000..), every:K, log:K, first:N, last:N"
)


def _available(revisions: list[Revision]) -> str:
    names = [r.name for r in revisions]
    if len(names) > 10:
        names = names[:5] + [f"... ({len(revisions)} in all) ..."] + names[-3:]
    return ", ".join(names)


def _bound(text: str, revisions: list[Revision], spec: str) -> int | None:
    """A range end: empty, a step number, or a revision name."""
    if not text:
        return None
    if text.isdigit():
        return int(text)
    for rev in revisions:
        if rev.name == text:
            if rev.step is None:
                break
            return rev.step
    parsed = parse_revision(text)
    if parsed.step is None:
        raise SelectionError(f"range end {text!r} in {spec!r} is no step or revision name; {SELECT_HELP}")
    return parsed.step


def _count(term: str, spec: str) -> int:
    try:
        n = int(term.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise SelectionError(f"{term!r} in {spec!r} needs a positive count, like {term.split(':')[0]}:10")
    return n


def _log_spaced(revisions: list[Revision], k: int) -> list[Revision]:
    stepped = [r for r in revisions if r.step is not None]
    if k >= len(stepped):
        return stepped
    chosen = [r for r in stepped if r.step == 0][:1]
    positive = [r for r in stepped if r.step > 0]
    slots = k - len(chosen)
    if slots <= 0 or not positive:
        return chosen
    low, high = math.log(positive[0].step), math.log(positive[-1].step)
    for i in range(slots):
        target = low + (high - low) * (i / (slots - 1) if slots > 1 else 1.0)
        best = min(positive, key=lambda r: abs(math.log(r.step) - target))
        if best not in chosen:
            chosen.append(best)
    return chosen


def select(revisions: list[Revision], spec: str | None) -> list[Revision]:
    """The revisions a selection spec names, in training order; an error shows what exists."""
    revisions = training_order(revisions)
    if not revisions:
        raise SelectionError("there are no revisions to select from")
    if spec is None or spec.strip() in ("", "all"):
        return revisions
    chosen: set[str] = set()
    by_name = {r.name: r for r in revisions}
    for term in (t.strip() for t in spec.split(",")):
        if not term:
            continue
        if term == "all":
            matched = revisions
        elif term in by_name:
            matched = [by_name[term]]
        elif ".." in term:
            first, _, last = term.partition("..")
            low, high = _bound(first, revisions, spec), _bound(last, revisions, spec)
            matched = [
                r for r in revisions
                if r.step is not None and (low is None or r.step >= low) and (high is None or r.step <= high)
            ]
        elif term.startswith("every:"):
            matched = revisions[:: _count(term, spec)]
        elif term.startswith("log:"):
            matched = _log_spaced(revisions, _count(term, spec))
        elif term.startswith("first:"):
            matched = revisions[: _count(term, spec)]
        elif term.startswith("last:"):
            matched = revisions[-_count(term, spec) :]
        else:
            raise SelectionError(f"no revision {term!r}; available: {_available(revisions)}")
        if not matched:
            raise SelectionError(f"{term!r} matches no revision; available: {_available(revisions)}")
        chosen.update(r.name for r in matched)
    return [r for r in revisions if r.name in chosen]
