"""Revision names of checkpoint suites, placed in training order.

A training run is a tree, not a line: a trunk of stages and phases (pre-training,
long-context extension, annealing) and branches that leave it (OLMo-2's stage-2
ingredients, three anneals from one stage-1 checkpoint; OLMo-3's ablation mixes). Names
are parsed for stage, branch, phase, step and tokens, never sorted as text: ``step1000``
comes after ``step512``. Where a stage counts its steps (and tokens) from zero again,
as OLMo-2's stage 2 does, `at` and `tokens` continue from where the run forked, so they
count from the start of training. A name that fits no scheme (``main``, ``fp32``) is
placed by commit identity, beside the revision with the same commit; if there is none it
is reported and left out of ranges, never silently put first or last.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

from ..errors import SelectionError

log = logging.getLogger(__name__)

_SCALE = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9, "t": 10**12, "T": 10**12}


def _number(tag: str) -> str:
    return rf"(?P<{tag}>\d+(?:\.\d+)?)(?P<{tag}_unit>[kKmMbBtT]?)"


# -tokens84B (OLMo), -token-1007B (TinyLlama), -tokens15T (Apertus), -350BT (FineWeb ablations)
_TOKENS = rf"(?:-tokens?-?{_number('tokens')}|-{_number('bt')}T)?"
_PATTERNS = [
    # OLMo-2/3 and SmolLM3 stages: stage1-step{N}[-tokens{T}B], stage2-ingredient{k}-step{N}-tokens{T}B,
    # stage2-step{N}-{ablation} (OLMo-3 side lines), stage1-step-{N} (SmolLM3)
    re.compile(rf"^stage(?P<stage>\d+)(?:-ingredient(?P<ingredient>\d+))?-step-?{_number('step')}{_TOKENS}"
               rf"(?:-(?P<suffix>[A-Za-z][\w.-]*))?$"),
    # Pythia step{N}, OLMo step{N}-tokens{T}B, SmolLM2 step-{N}, TinyLlama step-480k-token-1007B, BLOOM global_step{N}
    re.compile(rf"^(?:global_)?step-?{_number('step')}{_TOKENS}$"),
    # Phases after pre-training: Apertus longctx-step{N}, SmolLM3 lc-32k-to-64k-step-{N}, Lucie extension_step{N}
    re.compile(rf"^(?P<phase>[A-Za-z][\w-]*?)[-_]step-?{_number('step')}{_TOKENS}$"),
    # LLM360 Amber/Crystal/K2 ckpt_{N}; stanford-crfm checkpoint-{N}
    re.compile(rf"^(?:ckpt_|checkpoint-){_number('step')}$"),
]
# Phases after pre-training, in the order runs take them; others come after pre-training too, by name.
_PHASE_RANK = (("anneal", 3), ("", 2))


def _phase_rank(phase: str | None) -> int:
    if phase is None:
        return 0
    return next(rank for prefix, rank in _PHASE_RANK if phase.lower().startswith(prefix))


def _value(match: re.Match, tag: str) -> int | None:
    if match.groupdict().get(tag) is None:
        return None
    return round(float(match[tag]) * _SCALE[match[f"{tag}_unit"] or ""])


@dataclass(frozen=True)
class Revision:
    """One checkpoint's name and what it says about where the checkpoint sits in training."""

    name: str
    step: int | None = None
    """The step as the name gives it (within its stage, where a stage counts from zero)."""
    tokens: int | None = None
    """Tokens seen since the start of training, where known."""
    stage: int | None = None
    branch: str | None = None
    """The side line it belongs to where the run branches (``ingredient1``, an ablation mix); None on the trunk."""
    phase: str | None = None
    """A named phase after pre-training (``longctx``, ``extension``, ``annealing``)."""
    commit: str | None = None
    at: int | None = None
    """Steps since the start of training (see `place`); ranges and ``log:K`` count in these."""
    alias_of: str | None = None
    """For a name that fits no scheme: the placed revision with the same commit."""

    @property
    def parsed(self) -> bool:
        return self.step is not None

    def sort_key(self) -> tuple:
        """Position within its line: stage or phase, then step, then tokens."""
        return (_phase_rank(self.phase), self.stage or 1, _natural(self.phase or ""), self.step or 0, self.tokens or 0,
                self.name)


def _natural(text: str) -> tuple:
    """Text with its digit runs compared as numbers: lc-4k-to-32k before lc-32k-to-64k."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def parse_revision(name: str, tokens_per_step: int | None = None, commit: str | None = None) -> Revision:
    """Parse one revision name; `tokens_per_step` fills in tokens where the name has none."""
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if not match:
            continue
        groups = match.groupdict()
        step = _value(match, "step")
        tokens = _value(match, "tokens") if groups.get("tokens") else _value(match, "bt")
        if tokens is None and tokens_per_step is not None:
            tokens = step * tokens_per_step
        ingredient, suffix = groups.get("ingredient"), groups.get("suffix")
        branch = f"ingredient{ingredient}" if ingredient else suffix
        stage = int(groups["stage"]) if groups.get("stage") else None
        return Revision(name, step, tokens, stage, branch, groups.get("phase"), commit, at=step)
    return Revision(name, commit=commit)


def _continue(group: list[Revision], at: int, tokens: int | None, per_step: int | None) -> list[Revision]:
    """A stage (or side line) placed after a run that has reached step `at` and `tokens`: where its steps count
    from zero again, its `at` and tokens continue from there."""
    restarts = bool(group) and min(r.step for r in group) < at
    if not restarts:
        return group
    placed = []
    for r in group:
        counted = parse_revision(r.name).tokens  # as the name gives them: placing twice changes nothing
        if per_step:
            total = (at + r.step) * per_step
        else:
            total = tokens + counted if tokens is not None and counted is not None else None
        placed.append(replace(r, at=at + r.step, tokens=total))
    return placed


def place(revisions: list[Revision], tokens_per_step: int | None = None) -> list[Revision]:
    """All revisions in training order: the trunk, then each side line (its own revisions), then names placed by
    commit beside their twin; names that fit no scheme and match no commit come last."""
    parsed = [r for r in revisions if r.parsed]
    trunk: list[Revision] = []
    groups: dict[tuple, list[Revision]] = {}
    for rev in sorted((r for r in parsed if r.branch is None), key=Revision.sort_key):
        groups.setdefault((_phase_rank(rev.phase), rev.stage or 1, rev.phase or ""), []).append(rev)
    for group in groups.values():
        last = trunk[-1] if trunk else None
        trunk += _continue(group, last.at if last else 0, last.tokens if last else 0, tokens_per_step)
    lines = {}
    for branch in sorted({r.branch for r in parsed if r.branch is not None}):
        own = sorted((r for r in parsed if r.branch == branch), key=Revision.sort_key)
        fork = [r for r in trunk if r.sort_key()[:4] <= own[0].sort_key()[:4]]
        same_stage = [r for r in fork if r.stage == own[0].stage and r.phase == own[0].phase]
        last = fork[-1] if fork else None
        if same_stage:  # the side line counts as the trunk's stage it leaves does: take that stage's offsets
            first = same_stage[0]
            base = first.at - first.step
            named = parse_revision(first.name).tokens
            shift = first.tokens - named if first.tokens is not None and named is not None else None
            named_own = [parse_revision(r.name).tokens for r in own]  # as the names give them: placing twice changes nothing
            lines[branch] = [
                replace(r, at=base + r.step, tokens=t + shift if shift is not None and t is not None else r.tokens)
                for r, t in zip(own, named_own)
            ]
        else:
            lines[branch] = _continue(own, last.at if last else 0, last.tokens if last else 0, tokens_per_step)
    ordered = trunk + [r for branch in lines.values() for r in branch]
    commits = {r.commit: r.name for r in ordered if r.commit}
    others = sorted((r for r in revisions if not r.parsed), key=lambda r: r.name)
    for rev in others:
        twin = commits.get(rev.commit) if rev.commit else None
        if twin is not None:
            position = next(i for i, r in enumerate(ordered) if r.name == twin) + 1
            ordered.insert(position, replace(rev, alias_of=twin))
    return ordered + [r for r in others if not (r.commit and r.commit in commits)]


def training_order(revisions: list[Revision]) -> list[Revision]:
    """Revisions in training order (see `place`)."""
    return place(revisions)


def lines(placed: list[Revision]) -> dict[str | None, list[Revision]]:
    """Each line of training: None is the trunk; a side line is the trunk up to where it forks, then its own."""
    trunk = [r for r in placed if r.parsed and r.branch is None]
    result: dict[str | None, list[Revision]] = {None: trunk}
    for rev in placed:
        if rev.parsed and rev.branch is not None and rev.branch not in result:
            own = [r for r in placed if r.branch == rev.branch]
            result[rev.branch] = [r for r in trunk if r.sort_key()[:4] <= own[0].sort_key()[:4]] + own
    return result


def unplaced(placed: list[Revision]) -> list[Revision]:
    """Names that fit no scheme and share no commit with a placed revision."""
    return [r for r in placed if not r.parsed and r.alias_of is None]


SELECT_HELP = (
    "comma-separated terms: all, a revision name (main, step1000), a step range A..B (step1000..step20000, "
    "..5000, 1000..), every:K, log:K, first:N, last:N; ranges and counts apply to the trunk, or to the line "
    "--branch names"
)


def _available(revisions: list[Revision]) -> str:
    names = [r.name for r in revisions]
    if len(names) > 10:
        names = names[:5] + [f"... ({len(revisions)} in all) ..."] + names[-3:]
    return ", ".join(names)


def _bound(text: str, line: list[Revision], spec: str) -> int | None:
    """A range end in steps since the start of training: empty, a step number, a revision name in the line, or a
    plain ``step{N}`` name (which counts from the start) that no revision has."""
    if not text:
        return None
    if text.isdigit():
        return int(text)
    for rev in line:
        if rev.name == text:
            return rev.at
    parsed = parse_revision(text)
    if parsed.step is None or parsed.stage not in (None, 1) or parsed.phase or parsed.branch:
        raise SelectionError(f"range end {text!r} in {spec!r} is no step number and no revision of this line "
                             f"({_available(line)}); {SELECT_HELP}")
    return parsed.step


def _count(term: str, spec: str) -> int:
    try:
        n = int(term.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise SelectionError(f"{term!r} in {spec!r} needs a positive count, like {term.split(':')[0]}:10")
    return n


def _log_spaced(line: list[Revision], k: int) -> list[Revision]:
    if k >= len(line):
        return line
    chosen = [r for r in line if r.at == 0][:1]
    positive = [r for r in line if r.at > 0]
    slots = k - len(chosen)
    if slots <= 0 or not positive:
        return chosen
    low, high = math.log(positive[0].at), math.log(positive[-1].at)
    for i in range(slots):
        target = low + (high - low) * (i / (slots - 1) if slots > 1 else 1.0)
        best = min(positive, key=lambda r: abs(math.log(r.at) - target))
        if best not in chosen:
            chosen.append(best)
    return chosen


def select(revisions: list[Revision], spec: str | None, branch: str | None = None,
           tokens_per_step: int | None = None) -> list[Revision]:
    """The revisions a selection spec names, in training order; an error shows what exists.

    Ranges, ``every``, ``log``, ``first`` and ``last`` apply to one line of training: the trunk, or the
    side line `branch` with the trunk leading into it. ``all`` is every revision (of that line, with
    `branch`); a name picks that revision wherever it is.

    Raises `SelectionError` for a spec that cannot be parsed or matches nothing, naming what exists.
    """
    placed = place(revisions, tokens_per_step)
    if not placed:
        raise SelectionError("there are no revisions to select from")
    by_line = lines(placed)
    if branch not in by_line:
        names = ", ".join(str(b) for b in by_line if b is not None) or "none: this run does not branch"
        raise SelectionError(f"no branch {branch!r}; branches: {names}")
    line = by_line[branch]
    everything = placed if branch is None else line
    left_out = unplaced(placed)
    terms = [t.strip() for t in (spec or "all").split(",")]
    if not any(terms):
        raise SelectionError(f"selection {spec!r} names nothing; {SELECT_HELP}")
    by_name = {r.name: r for r in placed}
    chosen: set[str] = set()
    for term in terms:
        if not term:
            continue
        if term == "all":
            matched = everything
        elif term in by_name:
            matched = [by_name[term]]
        elif ".." in term:
            first, _, last = term.partition("..")
            low, high = _bound(first, line, spec), _bound(last, line, spec)
            matched = [r for r in line if (low is None or r.at >= low) and (high is None or r.at <= high)]
        elif term.startswith("every:"):
            matched = line[:: _count(term, spec)]
        elif term.startswith("log:"):
            matched = _log_spaced(line, _count(term, spec))
        elif term.startswith("first:"):
            matched = line[: _count(term, spec)]
        elif term.startswith("last:"):
            matched = line[-_count(term, spec) :]
        else:
            raise SelectionError(f"no revision {term!r}; available: {_available(placed)}")
        if not matched:
            raise SelectionError(f"{term!r} matches no revision; available: {_available(line)}")
        chosen.update(r.name for r in matched)
    missed = [r.name for r in left_out if r.name not in chosen]
    if missed:
        log.warning("revisions whose names fit no scheme and whose commits match no other revision are left out of "
                    "ranges: %s; name them to select them", ", ".join(missed))
    return [r for r in placed if r.name in chosen]
