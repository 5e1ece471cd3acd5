"""Where checkpoints come from: a local directory, or a model repo on the Hugging Face Hub.

Both kinds of source answer the same four calls, so a scan does not care which it has:
`checkpoints(selection)` lists the selected revisions in training order,
`metadata(checkpoint)` gives a directory holding at least its config and tokenizer,
`fetch(checkpoint)` makes its weights local, and `release(checkpoint)` frees what
`fetch` took (for the Hub: deletes the revision from the cache if ckpt-trace downloaded it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from ..errors import SelectionError, SourceError
from ..paths import home, json_object
from .hub import tokens_per_step
from .identity import file_stamps, local_identity
from .revisions import Revision, parse_revision, select

EVAL_FILE = "ckpt_trace_eval.json"
"""A checkpoint's own evaluation record, written beside its weights by the micro suite."""

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
RELEASE = "main"
"""The revision that holds the released model, on the Hub and in a directory of revisions (see `revisions.place`)."""


@dataclass(frozen=True)
class Checkpoint:
    """One revision of one model; `path` is set once its files are local."""

    model: str
    revision: Revision
    path: Path | None = None
    duplicate_of: str | None = None
    """An earlier revision (in training order) with byte-identical weights."""
    weight_bytes: int | None = None
    files: object = None
    """Source-specific description of what to fetch."""
    weights: str | None = None
    """Fingerprint of the weight files and config (see `ckpt_trace.fetch.identity`): what is scored, whatever the
    name."""
    source: str | None = None
    """Where it is read (see `source_name`): the absolute path of a local folder of revisions (or of one model
    directory), a built micro suite by recipe, or a Hub repo id. Two folders of one name are two models, told apart
    by it."""
    stamps: tuple | None = None
    """For a local checkpoint, its files' `identity.file_stamps` when `weights` was taken; None on the Hub, whose
    revisions are fetched by commit into a cache that is never written in place."""

    def record(self) -> dict:
        """The evaluation record kept beside the weights (validation loss, tokens), or {}."""
        file = self.path / EVAL_FILE if self.path else None
        try:
            return json_object(file) if file and file.is_file() else {}
        except (OSError, ValueError) as err:
            raise SourceError(f"cannot read {file}: {err}") from err

    def val_loss(self) -> float | None:
        """The validation loss recorded beside the weights, if any."""
        value = self.record().get("val_loss")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SourceError(f"{self.path / EVAL_FILE}: val_loss is {value!r}, not a number")
        return float(value) if value is not None else None


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _local(model: str, revision: Revision, path: Path, source: str | os.PathLike) -> Checkpoint:
    identity = local_identity(path)
    return Checkpoint(model, revision, path, weight_bytes=identity.weight_bytes, weights=identity.fingerprint,
                      stamps=identity.stamps, source=str(source))


def identified_now(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint with its identity taken again, right before its files are read: a local checkpoint's
    files may have changed since it was listed (only changed files are hashed again)."""
    if checkpoint.stamps is None or checkpoint.path is None:
        return checkpoint
    identity = local_identity(checkpoint.path)
    return replace(checkpoint, weights=identity.fingerprint, weight_bytes=identity.weight_bytes, stamps=identity.stamps)


def changed_since(checkpoint: Checkpoint) -> bool:
    """Whether a local checkpoint's files are no longer those its identity was taken from (see `identified_now`)."""
    return checkpoint.stamps is not None and checkpoint.path is not None and file_stamps(checkpoint.path) != checkpoint.stamps


def changed_error(checkpoint: Checkpoint, doing: str = "scored") -> SourceError:
    """The error of a checkpoint whose files changed while they were read."""
    return SourceError(f"the weights of {checkpoint.revision.name} ({checkpoint.path}) changed while they were {doing}; "
                       "run again once they are written")


def mark_duplicates(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Point each checkpoint whose weights equal an earlier one's (in the given order) at that one."""
    first: dict[str, str] = {}
    marked = []
    for checkpoint in checkpoints:
        earlier = first.setdefault(checkpoint.weights, checkpoint.revision.name) if checkpoint.weights else None
        duplicate = earlier if earlier != checkpoint.revision.name else None
        marked.append(replace(checkpoint, duplicate_of=duplicate))
    return marked


MICRO_SUITE = "micro-suite"
"""The folder under ckpt-trace's home where the built-in suites are built, one folder per recipe and suite."""


def source_name(folder: str | os.PathLike) -> str:
    """The source a local folder is recorded as: its absolute path; for a built micro suite
    (``<home>/micro-suite/<recipe>/<name>``, holding its ``suite.json``), ``micro-suite:<recipe>/<name>`` wherever
    that home is, so that the suite built from one recipe on any machine is one source (its weights may differ
    there: another CPU rounds otherwise, and the weights on disk decide which scan is drawn)."""
    folder = Path(folder).resolve()
    if (folder / "suite.json").is_file() and folder.parent.parent.name == MICRO_SUITE:
        return f"{MICRO_SUITE}:{folder.parent.name}/{folder.name}"
    return str(folder)


def _cache_snapshot(path: Path) -> tuple[str, Revision] | None:
    """The repo id and revision of a Hugging Face cache snapshot folder (``models--org--name/snapshots/<commit>``)."""
    folder, snapshots, commit = path.parts[-3:] if len(path.parts) >= 3 else ("", "", "")
    if snapshots != "snapshots" or not folder.startswith("models--") or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None
    repo_id = folder.removeprefix("models--").replace("--", "/")  # the Hub forbids "--" inside names
    refs = path.parent.parent / "refs"
    branches = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*")
                      if p.is_file() and p.read_text().strip() == commit) if refs.is_dir() else []
    revisions = [parse_revision(b, tokens_per_step(repo_id), commit) for b in branches]
    # A training checkpoint's own name rather than an alias such as main; the commit itself when no branch names it.
    best = next((r for r in revisions if r.parsed), revisions[0] if revisions else Revision(commit, commit=commit))
    return repo_id, best


def single_checkpoint(path: Path) -> Checkpoint:
    """One model directory, named as a user would name it.

    A Hugging Face cache snapshot is its repo id at the branch that points at it; a directory named like a
    revision (``suite/step1000``) is that revision of its parent, as in a scan of the whole suite; a link
    to one (``suite/main -> step1000``) is the revision it points at, in the suite the link is in; any
    other directory is revision ``main`` of a model named after it.
    """
    given = Path(os.path.abspath(path))  # the names the user gave, links not followed
    if (snapshot := _cache_snapshot(given) or _cache_snapshot(given.resolve())) is not None:  # or a link to one
        return _local(*snapshot, path, snapshot[0])
    target = parse_revision(given.resolve().name)
    if given.is_symlink() and target.parsed:
        return _local(given.parent.name, target, path, source_name(given.parent))
    revision = parse_revision(given.name)
    if revision.parsed:
        return _local(given.parent.name, revision, path, source_name(given.parent))
    return _local(given.name, Revision("main"), path, source_name(given))


class LocalSource:
    """A model directory (one checkpoint) or a directory of revision subdirectories.

    Subdirectories are named after revisions (``step0/``, ``step1000/``); a symbolic link
    to a sibling (``main -> step1000``) is an alias and is not scanned twice. `model` is
    the suite directory's name; for one model directory, see `single_checkpoint`.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            hint = "" if self.root.exists() else (
                f"; {str(self.root.parent)!r} holds: {', '.join(sorted(p.name for p in self.root.parent.iterdir())[:8])}"
                if self.root.parent.is_dir() and str(self.root.parent) != "." else "")
            raise SourceError(f"source {str(root)!r} is not a directory{hint}")
        self.model = single_checkpoint(self.root).model if _is_model_dir(self.root) else Path(os.path.abspath(root)).name

    def checkpoints(self, selection: str | None = None, branch: str | None = None) -> list[Checkpoint]:
        if _is_model_dir(self.root):
            return [single_checkpoint(self.root)]
        subdirs = {p.name: p for p in sorted(self.root.iterdir()) if p.is_dir() and _is_model_dir(p)}
        real = {p.resolve() for p in subdirs.values() if not p.is_symlink()}
        subdirs = {n: p for n, p in subdirs.items() if not (p.is_symlink() and p.resolve() in real)}
        if not subdirs:
            raise SourceError(f"{str(self.root)!r} is no model: it has no config.json and no subdirectories with one")
        checkpoints = []
        for rev in select([parse_revision(n) for n in subdirs], selection, branch, release=RELEASE):
            checkpoint = _local(self.model, rev, subdirs[rev.name], source_name(self.root))
            try:
                tokens = checkpoint.record().get("tokens")
            except SourceError:  # a scan of this revision reports it, as that revision's failure
                tokens = None
            if rev.tokens is None and isinstance(tokens, int):
                checkpoint = replace(checkpoint, revision=replace(rev, tokens=tokens))
            checkpoints.append(checkpoint)
        return mark_duplicates(checkpoints)

    def metadata(self, checkpoint: Checkpoint) -> Path:
        return checkpoint.path

    def fetch(self, checkpoint: Checkpoint) -> Checkpoint:
        return checkpoint

    def release(self, checkpoint: Checkpoint) -> None:
        pass


class HubSource:
    """A model repo on the Hub, streamed revision by revision through the Hugging Face cache."""

    def __init__(self, repo_id: str, cache_dir: str | os.PathLike | None = None, ledger: Path | None = None):
        from .hub import HubRepo

        self.repo = HubRepo(repo_id, cache_dir, ledger)
        self.model = repo_id

    def checkpoints(self, selection: str | None = None, branch: str | None = None) -> list[Checkpoint]:
        """Selected revisions with their files; byte-identical weights point at the first revision that has them."""
        listed = self.repo.revisions()
        revisions = select(listed, selection, branch, tokens_per_step(self.model), self._release(listed))
        checkpoints = [
            # A listing that failed is kept as the files: fetch() raises it, so the scan records the revision as failed.
            Checkpoint(self.model, rev, files=files, source=self.model) if isinstance(files, Exception)
            else Checkpoint(self.model, rev, weight_bytes=files.weight_bytes, files=files, weights=files.fingerprint,
                            source=self.model)
            for rev, files in zip(revisions, self.repo.describe(revisions))
        ]
        return mark_duplicates(checkpoints)

    def _release(self, listed: list[Revision]) -> str | None:
        """RELEASE, unless its own commit holds no weight files: a README-only main (SmolLM2's and SmolLM3's
        checkpoint repos) is no final model, so it does not end the trunk; a scan skips it where it is named."""
        main = next((r for r in listed if r.name == RELEASE and r.alias_of is None), None)
        if main is None:
            return RELEASE
        try:
            return RELEASE if self.repo.files(main).fingerprint is not None else None
        except SourceError:  # cannot tell: the release it is, and a scan of it records the failure
            return RELEASE

    def _files(self, checkpoint: Checkpoint):
        if isinstance(checkpoint.files, Exception):
            raise checkpoint.files
        return checkpoint.files

    def metadata(self, checkpoint: Checkpoint) -> Path:
        """A snapshot holding the checkpoint's config and tokenizer (no weights)."""
        from .hub import choose_files

        names = self._files(checkpoint).files
        side = choose_files({f: (0, "") for f in names if not f.endswith((".bin", ".safetensors"))})
        return self.repo.download(checkpoint.revision, side)

    def fetch(self, checkpoint: Checkpoint) -> Checkpoint:
        path = self.repo.download(checkpoint.revision, self._files(checkpoint))
        return replace(checkpoint, path=path)

    def release(self, checkpoint: Checkpoint) -> None:
        self.repo.evict(checkpoint.revision)


def open_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """A LocalSource for an existing directory, a HubSource for a repo id like ``org/name``.

    A name like ``runs/model`` whose first part is a local directory is taken for a mistyped path,
    not a repo id: it fails at once, instead of after the retries of a Hub lookup.
    """
    path = Path(source)
    if path.exists() or not _REPO_ID.match(str(source)) or path.parent.is_dir() and str(path.parent) != ".":
        return LocalSource(source)
    return HubSource(str(source), cache_dir)


def weights_on_disk(source: str, cache_dir: str | os.PathLike | None = None) -> dict[str, str] | None:
    """{revision: fingerprint} of a source's revisions as their files are on this machine now: a local folder's, or
    a Hub repo's whose weights are in the Hugging Face cache (by the branch or tag that names each); None where the
    source is not here at all. Only weight files that changed since they were last hashed are read."""
    from .hub import HubRepo

    if source.startswith(f"{MICRO_SUITE}:"):
        source = str(home() / MICRO_SUITE / source.partition(":")[2])
    if os.path.isabs(source) or not _REPO_ID.match(source):
        try:
            return {c.revision.name: c.weights for c in LocalSource(source).checkpoints() if c.weights is not None}
        except (SourceError, SelectionError, OSError):  # gone, or no model any more
            return None
    repo = HubRepo(source, cache_dir)
    refs = repo.cached_refs()
    if not refs:
        return None
    fingerprints = {name: repo.cached_files(commit).fingerprint for name, commit in refs.items()}
    return {name: fingerprint for name, fingerprint in fingerprints.items() if fingerprint is not None}


def revision_table(source: str | os.PathLike, selection: str | None = None, cache_dir=None,
                   branch: str | None = None) -> pl.DataFrame:
    """The revisions of a source in training order: step, tokens, stage, phase, branch, commit, weight bytes,
    duplicates, and for the release whose commit is no checkpoint's, `after`: the trunk's last checkpoint, which it
    follows.
    Raises `SourceError` for a source that does not exist, `SelectionError` for a selection that matches nothing."""
    checkpoints = open_source(source, cache_dir).checkpoints(selection, branch)
    rows = [
        {
            "revision": c.revision.name, "step": c.revision.step, "tokens": c.revision.tokens,
            "stage": c.revision.stage, "phase": c.revision.phase, "branch": c.revision.branch,
            "commit": c.revision.commit, "weight_bytes": c.weight_bytes, "weights": c.weights,
            "duplicate_of": c.duplicate_of or c.revision.alias_of, "after": c.revision.after,
        }
        for c in checkpoints
    ]
    schema = {"revision": pl.String, "step": pl.Int64, "tokens": pl.Int64, "stage": pl.Int64, "phase": pl.String,
              "branch": pl.String, "commit": pl.String, "weight_bytes": pl.Int64, "weights": pl.String,
              "duplicate_of": pl.String, "after": pl.String}
    return pl.DataFrame(rows, schema=schema)
