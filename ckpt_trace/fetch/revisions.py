"""Revision names of checkpoint suites, placed in training order.

A training run is a tree, not a line: a trunk of stages and phases (pre-training, annealing,
long-context extension) and branches that leave it (OLMo-2's stage-2 ingredients, three anneals
from one stage-1 checkpoint; OLMo-3's ablation mixes). One grammar, not a pattern per suite,
reads every name for its stage or phase, step, tokens and side line (`parse_revision`); names are
never sorted as text: ``step1000`` comes after ``step512``. Where a stage counts its steps (and
tokens) from zero again, as OLMo-2's stage 2 does, `at` and `tokens` continue from where the run
forked, so they count from the start of training. The release (``main``) is the checkpoint whose
commit it shares, or else the final model, after the trunk's last checkpoint. Any other name with
no step (``fp32``) is placed beside the revision with the same commit; if there is none it is
reported and left out of ranges, never silently put first or last.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

from ..errors import SelectionError

log = logging.getLogger(__name__)

# -- the grammar of names ---------------------------------------------------------------
# A name is pieces between separators (- and _). A piece is letters, a number, or letters then a number with a
# unit: step480k, tokens84B, 2BT, 15T, phase1, ingredient3, 0020000. A keyword may stand apart from its number
# (step-024000, iter_0373000, tokens-0100B, step_20k).
_PIECE = re.compile(r"([a-z]*)(?:(\d+(?:\.\d+)?)(k|m|bt?|t)?)?|(.+)", re.IGNORECASE)  # the last group: other text
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "bt": 10**9, "t": 10**12}
_STEP = {"step", "steps", "iter", "iteration", "checkpoint", "ckpt"}
_TOKENS = {"tokens", "token", "tok"}
_STAGE = {"stage", "phase"}
_SIDE = {"ingredient", "seed"}
# Phase words, in the order runs take the phases. Lucie extends its context before it anneals; SmolLM3 and
# OLMo-3 anneal (decay) before their long-context stage. A phase named by no word here comes after pre-training,
# with the extensions; "final" closes its line and needs no number.
_PHASES = [(0, r"pre-?train\w*|base"), (1, r"ext|extension|extend\w*"), (2, r"anneal\w*|decay\w*|cooldown"),
           (3, r"longctx|long|lc|ctx|context"), (4, r"final")]
_OTHER, _FINAL = 1, 4


def _kind(word: str, number: str | None, unit: str) -> tuple[str, object]:
    """What a piece is, from its letters, number and unit: (kind, value), kind being step, tokens, stage, side (a side
    line's marker), number (a lone one) or word."""
    if number is None:
        return "word", None
    value = round(float(number) * _SCALE[unit])
    if word in _STEP and unit not in ("b", "bt", "t"):
        return "step", value
    if word in _TOKENS or not word and unit in ("b", "bt", "t"):
        return "tokens", value
    if not word:
        return "number", value
    if word in _STAGE and not unit:
        return "stage", value
    if word in _SIDE and not unit:
        return "side", f"{word}{value}"
    return "word", None


def _parts(name: str) -> list[tuple[str, object, int, int]]:
    """The pieces of a name between separators (- and _), each as (kind, value, start, end)."""
    pieces = [(p.start(), p.end(), (m[1] or m[4] or "").lower(), m[2], (m[3] or "").lower())
              for p in re.finditer(r"[^-_]+", name) for m in [_PIECE.fullmatch(p[0])]]
    parts, i = [], 0
    while i < len(pieces):
        start, end, word, number, unit = pieces[i]
        _, end_next, word_next, number_next, unit_next = pieces[i + 1] if i + 1 < len(pieces) else (0, 0, "-", None, "")
        i += 1
        if word == "global" and number is None and word_next in _STEP:  # BLOOM's global_step
            continue
        if number is None and word in _STEP | _TOKENS | _STAGE | _SIDE and not word_next and number_next:
            end, number, unit, i = end_next, number_next, unit_next, i + 1  # step-024000, iter_0373000, tokens-0100B
        parts.append((*_kind(word, number, unit), start, end))
    return parts


def _phase_rank(phase: str | None) -> int:
    """Where a phase comes in a run: its known words' latest rank, or just after pre-training for other words."""
    if phase is None:
        return 0
    ranks = [rank for word in re.split(r"[-_]", phase.lower()) for rank, words in _PHASES if re.fullmatch(words, word)]
    return max(ranks, default=_OTHER)


@dataclass(frozen=True)
class Revision:
    """One checkpoint's name and what it says about where the checkpoint sits in training."""

    name: str
    step: int | None = None
    """The step as the name gives it (within its stage, where a stage counts from zero)."""
    tokens: int | None = None
    """Tokens seen since the start of training, where known."""
    stage: int | None = None
    """The stage or phase number (``stage2``, ``phase1``); 1 for a name with none in a stage other names number."""
    branch: str | None = None
    """The side line it belongs to where the run branches (``ingredient1``, an ablation mix); None on the trunk."""
    phase: str | None = None
    """The words before the step that name a phase (``longctx``, ``extension``, ``anneal``, ``base_final``)."""
    commit: str | None = None
    at: int | None = None
    """Steps since the start of training (see `place`); ranges and ``log:K`` count in these. None for a checkpoint
    that ends its line with no step (``base_final``) and for the release: they come after every step of it."""
    alias_of: str | None = None
    """For a name with no step: the placed revision with the same commit."""
    after: str | None = None
    """For the release whose commit is no checkpoint's: the trunk's last checkpoint, which it follows."""

    @property
    def parsed(self) -> bool:
        """Whether the name itself places it: it has a step, or it is a final checkpoint."""
        return self.step is not None or _phase_rank(self.phase) == _FINAL

    def sort_key(self) -> tuple:
        """Position within its line: stage or phase, then step, then tokens."""
        return (_phase_rank(self.phase), self.stage or 1, _natural(self.phase or ""), self.step or 0, self.tokens or 0,
                self.name)


def _natural(text: str) -> tuple:
    """Text with its digit runs compared as numbers: lc-4k-to-32k before lc-32k-to-64k."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def parse_revision(name: str, tokens_per_step: int | None = None, commit: str | None = None) -> Revision:
    """Parse one revision name; `tokens_per_step` fills in tokens where the name has none.

    The step is the number after step, iter, checkpoint, ckpt or global_step, else a lone number; the words before
    it (after any stage number, which words before it only label) name the phase; tokens are a number after
    token(s), or one in billions or trillions (``2BT``, ``15T``); ``ingredient{k}``, ``seed{k}`` and whatever follows
    the step that the grammar does not read make the side line. A name with no step is not placed by its name,
    unless it ends its line (``base_final``).
    """
    parts = _parts(name)  # (kind, value, start, end)
    kinds = [kind for kind, *_ in parts]
    where = kinds.index("step") if "step" in kinds else kinds.index("number") if "number" in kinds else None
    before, after = (parts, []) if where is None else (parts[:where], parts[where + 1 :])
    suffix = next((p for p in after if p[0] in ("word", "number")), None)
    if suffix is not None:
        after = after[: after.index(suffix)]
    phase: list[tuple] = []
    for part in before:
        if part[0] in ("word", "number"):
            phase.append(part)
        elif part[0] == "stage":
            phase = []  # CrystalCoder_phase1_...: the words before the number name the run, not a phase
    phase_name = name[phase[0][2] : phase[-1][3]] if phase else None
    step = parts[where][1] if where is not None else None
    if step is None and _phase_rank(phase_name) != _FINAL:
        return Revision(name, commit=commit)
    read = {kind: value for kind, value, *_ in reversed(before + after)}  # the first of each kind
    tokens = read.get("tokens", step * tokens_per_step if tokens_per_step and step is not None else None)
    side = [value for kind, value, *_ in before + after if kind == "side"] + ([name[suffix[2] :]] if suffix else [])
    return Revision(name, step, tokens, read.get("stage"), "-".join(side) or None, phase_name, commit, at=step)


# -- training order ----------------------------------------------------------------------
def _continue(group: list[Revision], at: int, tokens: int | None, per_step: int | None) -> list[Revision]:
    """A stage (or side line) placed after a run that has reached step `at` and `tokens`: where its steps count
    from zero again, its `at` and tokens continue from there."""
    steps = [r.step for r in group if r.step is not None]
    if not steps or min(steps) >= at:
        return group
    placed = []
    for r in group:
        step = None if r.step is None else at + r.step  # a final checkpoint has none: it stays after every step
        counted = parse_revision(r.name).tokens  # as the name gives them: placing twice changes nothing
        if per_step or step is None:
            total = step * per_step if per_step and step is not None else None
        else:
            total = tokens + counted if tokens is not None and counted is not None else None
        placed.append(replace(r, at=step, tokens=total))
    return placed


def _reached(trunk: list[Revision]) -> tuple[int, int | None]:
    """The step and tokens the trunk has reached: its last checkpoint with a step."""
    last = next((r for r in reversed(trunk) if r.at is not None), None)
    return (last.at, last.tokens) if last else (0, 0)


def place(revisions: list[Revision], tokens_per_step: int | None = None, release: str | None = None) -> list[Revision]:
    """All revisions in training order: the trunk, then each side line (its own revisions), names placed by commit
    beside their twin, names that are placed neither by name nor by commit, and last the release.

    `release` names the revision that holds the released model (``main`` on the Hub). Where its commit is a
    checkpoint's it is placed beside it, as any other name; otherwise it is the final model: it ends the trunk's
    line, after its last checkpoint (see `lines`). With no `release`, such a name is reported as any other.
    """
    parsed = [r for r in revisions if r.parsed]
    trunk: list[Revision] = []
    groups: dict[tuple, list[Revision]] = {}
    for rev in sorted((r for r in parsed if r.branch is None), key=Revision.sort_key):
        groups.setdefault(rev.sort_key()[:3], []).append(rev)
    for group in groups.values():
        if any(r.stage for r in group):  # OLMo-2-7B's early names, unprefixed, are stage 1's
            group = [replace(r, stage=r.stage or 1) for r in group]
        trunk += _continue(group, *_reached(trunk), tokens_per_step)
    lines = {}
    for branch in sorted({r.branch for r in parsed if r.branch is not None}):
        own = sorted((r for r in parsed if r.branch == branch), key=Revision.sort_key)
        fork = [r for r in trunk if r.sort_key()[:4] <= own[0].sort_key()[:4]]
        same_stage = [r for r in fork if r.stage == own[0].stage and r.phase == own[0].phase and r.step is not None]
        if same_stage:  # the side line counts as the trunk's stage it leaves does: take that stage's offsets
            first = same_stage[0]
            base = first.at - first.step
            named = parse_revision(first.name).tokens
            shift = first.tokens - named if first.tokens is not None and named is not None else None
            named_own = [parse_revision(r.name).tokens for r in own]  # as named: placing twice changes nothing
            lines[branch] = [
                replace(r, at=base + r.step if r.step is not None else None,
                        tokens=t + shift if shift is not None and t is not None else r.tokens)
                for r, t in zip(own, named_own)
            ]
        else:
            lines[branch] = _continue(own, *_reached(fork), tokens_per_step)
    ordered = trunk + [r for branch in lines.values() for r in branch]
    commits = {r.commit: r.name for r in ordered if r.commit}
    others = sorted((replace(r, alias_of=None, after=None) for r in revisions if not r.parsed), key=lambda r: r.name)
    for rev in others:
        twin = commits.get(rev.commit) if rev.commit else None
        if twin is not None:
            position = next(i for i, r in enumerate(ordered) if r.name == twin) + 1
            ordered.insert(position, replace(rev, alias_of=twin))
    left = [r for r in others if not (r.commit and r.commit in commits)]
    ending = [replace(r, after=trunk[-1].name) for r in left if r.name == release and trunk]
    return ordered + [r for r in left if not (ending and r.name == release)] + ending


def lines(placed: list[Revision]) -> dict[str | None, list[Revision]]:
    """Each line of training: None is the trunk, ended by the release where it is no checkpoint; a side line is the
    trunk up to where it forks, then its own."""
    trunk = [r for r in placed if r.parsed and r.branch is None]
    result: dict[str | None, list[Revision]] = {None: trunk + [r for r in placed if r.after is not None]}
    for rev in placed:
        if rev.parsed and rev.branch is not None and rev.branch not in result:
            own = [r for r in placed if r.branch == rev.branch]
            result[rev.branch] = [r for r in trunk if r.sort_key()[:4] <= own[0].sort_key()[:4]] + own
    return result


def unplaced(placed: list[Revision]) -> list[Revision]:
    """Names that no grammar rule places, that share no commit with a placed revision, and that are not the release."""
    return [r for r in placed if not r.parsed and r.alias_of is None and r.after is None]


# -- selection ---------------------------------------------------------------------------
SELECT_HELP = (
    "comma-separated terms: all, a revision name (main, step1000), a step range A..B (step1000..step20000, "
    "..5000, 1000..), every:K, log:K, first:N, last:N; ranges and counts apply to the trunk, or to the line "
    "--branch names; a range whose ends are revisions of one side line follows that line, and so do the "
    "spec's counts"
)


def _available(revisions: list[Revision]) -> str:
    names = [r.name for r in revisions]
    if len(names) > 10:
        names = names[:5] + [f"... ({len(revisions)} in all) ..."] + names[-3:]
    return ", ".join(names)


def _range_line(term: str, by_line: dict[str | None, list[Revision]], branch: str | None, spec: str) -> str | None:
    """The line a range follows: the selected line (the trunk, or `branch`'s) where it holds the range's ends; with
    no `branch`, the side line that holds both ends that are revisions. An open upper end is the selected line's."""
    first, _, last = term.partition("..")
    holding = [{key for key, line in by_line.items() if any(r.name == end for r in line)} for end in (first, last)]
    named = [keys for keys in holding if keys]
    if not last:
        named.append({branch})
    common = set.intersection(*named) if named else {branch}
    if branch in common:
        return branch
    if branch is None and common:
        return min(common)
    if all(holding) and not holding[0] & holding[1]:
        ends = ["the trunk" if None in keys else min(keys) for keys in holding]
        raise SelectionError(f"range {term!r} in {spec!r} runs from {ends[0]} ({first}) to {ends[1]} ({last}); "
                             f"a range follows one line of training")
    return branch  # the end that is not on it is reported by _bound


def _bound(text: str, line: list[Revision], spec: str) -> tuple[str, int] | None:
    """A range end: None when open, ("index", i) for the line's revision i, or ("at", n) for n steps since the start:
    a number, or a plain ``step{N}`` name (which counts from the start) that no revision has."""
    if not text:
        return None
    if text.isdigit():
        return ("at", int(text))
    for i, rev in enumerate(line):
        if rev.name == text:
            return ("index", i)
    parsed = parse_revision(text)
    if parsed.step is None or parsed.stage not in (None, 1) or parsed.phase or parsed.branch:
        raise SelectionError(f"range end {text!r} in {spec!r} is no step number and no revision of this line "
                             f"({_available(line)}); {SELECT_HELP}")
    return ("at", parsed.step)


def _in_range(i: int, rev: Revision, low: tuple[str, int] | None, high: tuple[str, int] | None) -> bool:
    # A revision with no `at` (the release, base_final) comes after every step of its line.
    if low is not None and not (i >= low[1] if low[0] == "index" else rev.at is None or rev.at >= low[1]):
        return False
    return high is None or (i <= high[1] if high[0] == "index" else rev.at is not None and rev.at <= high[1])


def _count(term: str, spec: str) -> int:
    n = int(term.split(":", 1)[1]) if term.split(":", 1)[1].strip().isdigit() else 0
    if n < 1:
        raise SelectionError(f"{term!r} in {spec!r} needs a positive count, like {term.split(':')[0]}:10")
    return n


def _log_spaced(line: list[Revision], k: int) -> list[Revision]:
    """About `k` revisions evenly spaced in log steps, from step 0 (where the line has it) to the line's end."""
    if k >= len(line):
        return line
    chosen = [r for r in line if r.at == 0][:1]
    positive = [(math.log(r.at), r) for r in line if r.at]
    end = [r for r in line if r.at is None][-1:]  # the release or a final checkpoint ends the line
    if end:
        positive = positive[:-1] + [(positive[-1][0] if positive else 0.0, end[0])]
    slots = k - len(chosen)
    if slots <= 0 or not positive:
        return chosen
    low, high = positive[0][0], positive[-1][0]
    for i in range(slots):
        target = low + (high - low) * (i / (slots - 1) if slots > 1 else 1.0)
        best = min(positive, key=lambda p: abs(p[0] - target))[1]
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen, key=line.index)


def select(revisions: list[Revision], spec: str | None, branch: str | None = None,
           tokens_per_step: int | None = None, release: str | None = None) -> list[Revision]:
    """The revisions a selection spec names, in training order; an error shows what exists.

    Ranges, ``every``, ``log``, ``first`` and ``last`` apply to one line of training: the trunk, or the
    side line `branch` with the trunk leading into it. Without `branch`, a range whose ends are revisions of one
    side line follows that line, and the spec's counts follow it too. ``all`` is every revision (of that line,
    with `branch`); a name picks that revision wherever it is. `release` is as in `place`: where it is the final
    model, it ends the trunk, so ``last:1`` and open ranges (``A..``) take it.

    Raises `SelectionError` for a spec that cannot be parsed or matches nothing, or a range with ends on two lines,
    naming what exists.
    """
    placed = place(revisions, tokens_per_step, release)
    if not placed:
        raise SelectionError("there are no revisions to select from")
    by_line = lines(placed)
    if branch not in by_line:
        names = ", ".join(str(b) for b in by_line if b is not None) or "none: this run does not branch"
        raise SelectionError(f"no branch {branch!r}; branches: {names}")
    terms = [t.strip() for t in (spec or "all").split(",")]
    if not any(terms):
        raise SelectionError(f"selection {spec!r} names nothing; {SELECT_HELP}")
    by_name = {r.name: r for r in placed}
    chosen: set[str] = set()
    followed: set[str] = set()  # the side lines that ranges followed without `branch`
    counts = [t for t in terms if re.fullmatch(r"(every|log|first|last):.*", t)]
    for term in (t for t in terms if t and t not in counts):
        if term == "all":
            matched = placed if branch is None else by_line[branch]
        elif term in by_name:
            matched = [by_name[term]]
        elif ".." in term:
            key = _range_line(term, by_line, branch, spec)
            followed |= {key} - {branch}
            low, high = (_bound(end, by_line[key], spec) for end in term.partition("..")[::2])
            matched = [r for i, r in enumerate(by_line[key]) if _in_range(i, r, low, high)]
            if not matched:
                raise SelectionError(f"{term!r} matches no revision; available: {_available(by_line[key])}")
        else:
            raise SelectionError(f"no revision {term!r}; available: {_available(placed)}")
        chosen.update(r.name for r in matched)
    if len(followed) > 1 and counts:
        raise SelectionError(f"{', '.join(counts)} in {spec!r}: its ranges follow {' and '.join(sorted(followed))}, "
                             f"and counts follow one line; name it with --branch")
    line = by_line[followed.pop() if followed else branch]
    if counts and not line:
        raise SelectionError(f"{counts[0]!r} matches no revision: no name has a step; available: {_available(placed)}")
    for term in counts:
        n = _count(term, spec)
        if term.startswith("every:"):
            chosen.update(r.name for r in line[::n])
        elif term.startswith("log:"):
            chosen.update(r.name for r in _log_spaced(line, n))
        else:
            chosen.update(r.name for r in (line[:n] if term.startswith("first:") else line[-n:]))
    missed = [r.name for r in unplaced(placed) if r.name not in chosen]
    if missed:
        log.warning("revisions whose names have no step and whose commits match no other revision are left out of "
                    "ranges: %s; name them to select them", ", ".join(missed))
    return [r for r in placed if r.name in chosen]
