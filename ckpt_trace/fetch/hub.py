"""Checkpoint suites on the Hugging Face Hub, through huggingface_hub.

Listing reads the repo's branches and, per revision, its tree: file sizes, the LFS
sha256 of every weight file and the git blob id of its config, so identical revisions are
found before anything is downloaded. A download fetches one weight format (safetensors where the revision has
it, else ``.bin``) plus config and tokenizer files into the usual Hugging Face cache;
eviction deletes a revision from that cache only if ckpt-trace downloaded it, which a
small ledger beside ckpt-trace's other files remembers across interrupted runs.
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and the usual login are honoured.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError, one_line
from .cache import DownloadLedger, delete_entries
from .identity import computes, fingerprint, weight_files
from .revisions import Revision, parse_revision, place

log = logging.getLogger(__name__)

SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "ckpt_trace_eval.json", "ckpt_trace_prune.json",
)
# Suites whose names carry only the step: tokens seen per optimizer step.
TOKENS_PER_STEP = {"EleutherAI/pythia-": 2_097_152, "HuggingFaceTB/SmolLM3-": 2_359_296}

RETRIES = 4
"""Attempts at one download before a revision counts as failed."""
BACKOFF_S = 2.0
"""Wait before the second attempt; doubled after each further failure."""


@dataclass(frozen=True)
class HubFiles:
    """What one revision's tree says: the files to fetch, their weight bytes, and a fingerprint of the weights."""

    files: tuple[str, ...]
    weight_format: str | None
    weight_bytes: int
    fingerprint: str | None
    """`identity.fingerprint` of the weight files and of the files that decide the computation (None when the
    revision has no weight files)."""


def tokens_per_step(repo_id: str) -> int | None:
    return next((n for prefix, n in TOKENS_PER_STEP.items() if repo_id.startswith(prefix)), None)


def choose_files(entries: dict[str, tuple[int, str]]) -> HubFiles:
    """Pick one weight format and the side files from {path: (size, sha256 or blob id)}."""
    chosen_format, weights = weight_files(entries)
    side = [p for p in entries if p in SIDE_FILES or computes(p)]  # the modeling code that trust_remote_code runs too
    tensors = [p for p in weights if not p.endswith(".json")]
    return HubFiles(
        files=tuple(sorted(side + weights)),
        weight_format=chosen_format,
        weight_bytes=sum(entries[p][0] for p in tensors),
        fingerprint=fingerprint({p: entries[p][1] for p in tensors}, {p: entries[p][1] for p in entries if computes(p)}),
    )


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors (connection refused, reset, timed out: no status code exists) of the HTTP
    library huggingface_hub is built on, httpx in 1.x and httpx2 in 2.x, found through the base class
    of huggingface_hub's own HTTP error rather than by importing either by name."""
    from huggingface_hub.errors import HfHubHTTPError

    for base in HfHubHTTPError.__mro__[1:]:
        library = sys.modules.get(base.__module__.partition(".")[0])
        if base.__name__ == "HTTPError" and isinstance(getattr(library, "TransportError", None), type):
            return (library.TransportError,)
    return ()


@functools.cache
def hub_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for a fault of the Hub, the network or the cache, never for a bug of ours: OSError
    (its HTTP answers, a missing repo, revision or file, offline mode, the cache's disk), an invalid repo id, a Xet
    transfer failing, and the transport errors of its HTTP library."""
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, XetDownloadError

    return (OSError, HFValidationError, XetDownloadError, EntryNotFoundError, *_network_errors())


def _transient(err: BaseException) -> bool:
    """A network fault or server error worth another try (not a missing repo, revision or file)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)):
            return False
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            return err.response.status_code >= 500 or err.response.status_code in (408, 429)
        if isinstance(err, (*_network_errors(), ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def with_retries(fn, what: str):
    """Call fn, retrying transient failures with exponential backoff."""
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except hub_errors() as err:
            if attempt == RETRIES or not _transient(err):
                raise
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d of %d in %.0fs", what, one_line(err), attempt, RETRIES - 1, delay)
            time.sleep(delay)


class HubRepo:
    """One model repo on the Hub (or in the local cache when offline)."""

    def __init__(self, repo_id: str, cache_dir: str | os.PathLike | None = None, ledger: Path | None = None):
        from huggingface_hub import HfApi, constants
        from huggingface_hub.file_download import repo_folder_name

        self.repo_id = repo_id
        self.api = HfApi()
        self.cache_dir = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
        self.offline = constants.HF_HUB_OFFLINE
        from ..paths import home

        self.ledger = DownloadLedger(ledger or home() / "downloads.json")
        self.repo_folder = self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")

    def _hub_error(self, err: Exception, action: str, revision: str | None = None) -> SourceError:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        if isinstance(err, RevisionNotFoundError):
            return SourceError(f"revision {revision!r} not found in {self.repo_id!r}; see `ckpt-trace revisions {self.repo_id}`")
        if isinstance(err, RepositoryNotFoundError):
            return SourceError(
                f"repo {self.repo_id!r} not found on {self.api.endpoint} (a private or gated repo needs `hf auth login`)"
            )
        where = f"{self.repo_id}@{revision}" if revision else self.repo_id
        return SourceError(f"{action} {where} failed: {one_line(err)}")

    # -- listing ----------------------------------------------------------------------
    def revisions(self) -> list[Revision]:
        """Every branch and tag (stanford-crfm's and BLOOM's checkpoints are tags), parsed and in training order."""
        per_step = tokens_per_step(self.repo_id)
        if self.offline:
            refs = self._cached_refs()
        else:
            try:
                refs = with_retries(lambda: self.api.list_repo_refs(self.repo_id), f"listing {self.repo_id}")
            except hub_errors() as err:
                raise self._hub_error(err, "listing") from err
            refs = {t.name: t.target_commit for t in refs.tags} | {b.name: b.target_commit for b in refs.branches}
        return place([parse_revision(name, per_step, commit) for name, commit in refs.items()], per_step)

    def _cached_refs(self) -> dict[str, str]:
        if not (refs := self.cached_refs()):
            raise SourceError(f"repo {self.repo_id!r} is not in the cache {self.cache_dir} and HF_HUB_OFFLINE is set")
        return refs

    def files(self, revision: Revision) -> HubFiles:
        """The files of one revision, from its tree listing (or its cached snapshot when offline)."""
        if self.offline:
            return self.cached_files(revision.commit or "")
        ref = revision.commit or revision.name
        try:  # some huggingface_hub releases retry tree listings themselves, others do not
            tree = with_retries(lambda: list(self.api.list_repo_tree(self.repo_id, revision=ref, recursive=True)),
                                f"listing {self.repo_id}@{revision.name}")
        except hub_errors() as err:
            raise self._hub_error(err, "listing", revision.name) from err
        entries = {
            f.path: (f.size, f.lfs.sha256 if f.lfs is not None else f.blob_id)
            for f in tree if hasattr(f, "blob_id")  # files, not folders
        }
        return choose_files(entries)

    def cached_files(self, commit: str) -> HubFiles:
        """The files of one commit's snapshot in the cache, named by their blobs (a blob's name is its sha256 for an
        LFS file, its git blob id for another, as the tree listing gives them)."""
        snapshot = self.repo_folder / "snapshots" / commit
        entries = {
            p.relative_to(snapshot).as_posix(): (p.stat().st_size, p.resolve().name)
            for p in snapshot.rglob("*") if p.is_file()
        }
        return choose_files(entries)

    def cached_refs(self) -> dict[str, str]:
        """{branch or tag: commit} of the repo as the cache last saw them; {} where it is not in the cache."""
        refs_dir = self.repo_folder / "refs"
        if not refs_dir.is_dir():
            return {}
        return {p.relative_to(refs_dir).as_posix(): p.read_text().strip() for p in refs_dir.rglob("*") if p.is_file()}

    def describe(self, revisions: list[Revision], workers: int = 8) -> list[HubFiles | SourceError]:
        """The files of many revisions, listed concurrently; a revision whose listing fails gets its error."""

        def files_or_error(revision: Revision) -> HubFiles | SourceError:
            try:
                return self.files(revision)
            except SourceError as err:
                return err

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(files_or_error, revisions))

    # -- cache ------------------------------------------------------------------------
    def snapshot(self, revision: Revision) -> Path:
        return self.repo_folder / "snapshots" / (revision.commit or "unknown")

    def is_cached(self, revision: Revision, files: HubFiles) -> bool:
        snapshot = self.snapshot(revision)
        return all((snapshot / f).is_file() for f in files.files)

    def download(self, revision: Revision, files: HubFiles) -> Path:
        """Fetch a revision's chosen files into the cache and return its snapshot directory."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        snapshot = self.snapshot(revision)
        # Held, and recorded before the first byte, so that an interrupted download is still ours to evict;
        # files that were in the cache before are not ours and are never evicted.
        with self.ledger.locked() as state:
            state.hold(snapshot)
            state.files.update(str(snapshot / f) for f in files.files if not (snapshot / f).is_file())
        try:
            path = with_retries(
                lambda: snapshot_download(
                    self.repo_id,
                    revision=revision.commit or revision.name,
                    allow_patterns=list(files.files),
                    cache_dir=self.cache_dir,
                    max_workers=8,
                ),
                f"downloading {self.repo_id}@{revision.name}",
            )
        except hub_errors() as err:
            if self.offline and isinstance(err, LocalEntryNotFoundError):
                raise SourceError(
                    f"revision {revision.name!r} of {self.repo_id!r} is not in the cache and HF_HUB_OFFLINE is set"
                ) from err
            raise self._hub_error(err, "download of", revision.name) from err
        return Path(path)

    def evict(self, revision: Revision) -> int:
        """Release a revision; when no other scan uses it, delete from the cache the files of it that ckpt-trace
        downloaded (see `cache.delete_entries`). Return the bytes freed."""
        snapshot = self.snapshot(revision)
        with self.ledger.locked() as state:  # no scan starts a download of it meanwhile
            if state.release(snapshot):
                return 0  # another scan still reads it; the last one to release it evicts
            entries = state.under(snapshot)
            freed = delete_entries(self.cache_dir, entries, snapshot)
            state.files.difference_update(map(str, entries))
        return freed
