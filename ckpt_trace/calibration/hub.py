"""A Hugging Face dataset's texts, read lazily, downloading only the files a draw needs.

Which files hold a split is what the ``datasets`` library says: its own resolution of the repo's configs (declared
in the README, or inferred from the file names as ``datasets`` infers them), splits and data files, made from the
repo's listing and README, with no data file downloaded. The files are then read here, one at a time, a batch of
rows at a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from ..errors import CalibrationError, ConfigError, one_line
from ..fetch.hub import hub_errors
from ..paths import atomic_write_bytes, home, json_object
from .local import READ_ERRORS, _jsonl_records

log = logging.getLogger(__name__)

HUB_POOL = 64
"""Blocks per sample that a Hub dataset split is drawn from: its first ``HUB_POOL * samples`` blocks, files in name
order, so that only the files holding those are downloaded (a local file is drawn from whole)."""

HUB_BATCH_ROWS = 1024
"""Rows of a dataset file read at a time."""

DATASET_FILES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".jsonl.zst")
"""The data files that calibration reads: parquet, and JSON lines (``.json`` too: lines, or one array of records),
gzipped (C4's ``.json.gz``) or zstd-compressed (the Pile's ``.jsonl.zst``)."""


class HubTexts:
    """The ``text`` column of one split of a Hugging Face dataset (``hf:REPO[:CONFIG][:SPLIT]``), read lazily.

    The split's files are resolved once, at the dataset's current commit, as ``datasets`` resolves them (a spec
    that names no config takes the default one, as ``datasets`` picks it; no split: ``train``), and remembered under
    ckpt-trace's home, so that ``HF_HUB_OFFLINE`` reads the same files at the same commit from the cache; iterating
    downloads each file only when the texts reach it, and reads it a batch of rows at a time, so that memory holds
    one batch and the draw downloads only the files it needs. Iterable again: later passes read the cached files.
    """

    def __init__(self, spec: str):
        parts = spec.removeprefix("hf:").split(":")
        if not parts[0] or len(parts) > 3:
            raise ConfigError(f"bad dataset spec {spec!r}; expected hf:REPO[:CONFIG][:SPLIT]")
        self.repo = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        self.commit, self.files = self._resolved(config, split)

    def _resolved(self, config: str | None, split: str) -> tuple[str, list[str]]:
        """The dataset's commit and the readable files of the split, in name order: resolved by ``datasets`` and
        remembered; offline, the remembered ones where the cache holds that commit, else resolved by ``datasets``
        over the cache's copy of the main branch (as huggingface_hub left it)."""
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.file_download import repo_folder_name

        record = home() / "datasets" / f"{self.repo.replace('/', '--')}.json"
        key = f"{config or ''}:{split}"
        if constants.HF_HUB_OFFLINE:
            try:
                listing = json_object(record)[key]
                commit, files = str(listing["commit"]), list(listing["files"])
                cached = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=self.repo, repo_type="dataset")
                if (cached / "snapshots" / commit).is_dir():
                    return commit, files
            except (OSError, ValueError, KeyError, TypeError):
                pass
            try:
                local = Path(snapshot_download(self.repo, repo_type="dataset"))
            except hub_errors() as err:
                raise CalibrationError(f"dataset {self.repo!r} is not in the cache, and HF_HUB_OFFLINE is set") from err
            return local.name, self._split_files(str(local), config, split, f"{local}/")
        try:
            commit = HfApi().dataset_info(self.repo, revision="main").sha
        except hub_errors() as err:  # the client raises several classes for one cause: unreachable or unknown
            raise CalibrationError(f"cannot fetch dataset {self.repo!r}: {one_line(err)}") from err
        files = self._split_files(self.repo, config, split, f"hf://datasets/{self.repo}@{commit}/", commit)
        try:
            memo = json_object(record) if record.is_file() else {}
        except (OSError, ValueError):
            memo = {}
        try:
            atomic_write_bytes(record, json.dumps(memo | {key: {"commit": commit, "files": files}}).encode())
        except OSError as err:  # a memo for offline use only
            log.warning("cannot remember the files of dataset %r for offline use: %s", self.repo, err)
        return commit, files

    def _split_files(self, where: str, config: str | None, split: str, prefix: str, commit: str | None = None
                     ) -> list[str]:
        """The readable files of `split` of `config` of the dataset at `where` (its repo id at `commit`, or a local
        copy), as ``datasets`` resolves them, named relative to the dataset's root (`prefix` taken off)."""
        import datasets
        import yaml
        from datasets import load_dataset_builder

        named = f"dataset {self.repo!r}" + (f" config {config!r}" if config else "")
        try:
            if config is None and datasets.get_dataset_default_config_name(where, revision=commit) is None:
                builder, names = None, datasets.get_dataset_config_names(where, revision=commit)
            else:
                builder = load_dataset_builder(where, name=config, revision=commit)
        # TypeError: datasets reading a card value of a type it does not expect (a number for a name, say).
        except (ValueError, TypeError, OSError, yaml.YAMLError, datasets.exceptions.DatasetsError, *hub_errors()) as err:
            raise CalibrationError(f"cannot resolve {named}: {one_line(err, 300)}") from err  # datasets' can run long
        if builder is None:
            tail = f":{split}" if split != "train" else ""
            raise CalibrationError(f"{named} declares several configs and no default ({', '.join(names)}); name one, "
                                   f"as hf:{self.repo}:{names[0]}{tail}")
        found = builder.config.data_files or {}
        if split not in found:
            raise CalibrationError(f"{named} has no split {split!r}; its splits: {', '.join(map(str, found)) or 'none'}")
        names = sorted(str(f).removeprefix(prefix) for f in found[split])
        readable = [n for n in names if n.endswith(DATASET_FILES)]
        if not readable:
            raise CalibrationError(f"split {split!r} of {named} has no file that calibration reads "
                                   f"({', '.join(DATASET_FILES)}): {_some(names) or 'no file'}")
        return readable

    def _download(self, name: str) -> Path:
        """One file of the dataset at the resolved commit, from the cache where it is there."""
        from huggingface_hub import constants, hf_hub_download

        try:
            return Path(hf_hub_download(self.repo, name, repo_type="dataset", revision=self.commit))
        except hub_errors() as err:
            if constants.HF_HUB_OFFLINE:
                raise CalibrationError(f"{name} of dataset {self.repo!r} (commit {self.commit[:12]}) is not in "
                                       "the cache, and HF_HUB_OFFLINE is set; read the dataset once online to "
                                       "cache it") from err
            raise CalibrationError(f"cannot fetch {name} of dataset {self.repo!r}: {one_line(err)}") from err

    def __iter__(self) -> Iterator[str]:
        for name in self.files:
            path = self._download(name)
            read = _parquet_texts if name.endswith(".parquet") else _json_texts if name.endswith(".json") else _jsonl_texts
            try:
                yield from read(path, name)
            except CalibrationError:
                raise
            except READ_ERRORS as err:  # pyarrow's for a damaged file or zstd, bad UTF-8, a gzip cut short or damaged
                raise CalibrationError(f"cannot read {name} of dataset {self.repo!r}: {one_line(err)}") from err


def _some(items: list[str], most: int = 6) -> str:
    """The first `most` items, and how many more."""
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _parquet_texts(path: Path, name: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    schema = file.schema_arrow
    if "text" not in schema.names:
        raise CalibrationError(f"dataset file {name} has no 'text' column (columns: {schema.names})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CalibrationError(f"dataset file {name} has a 'text' column of {kind}, not of strings")
    for batch in file.iter_batches(batch_size=HUB_BATCH_ROWS, columns=["text"]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _jsonl_texts(path: Path, name: str) -> Iterator[str]:
    for record in _jsonl_records(path, f"dataset file {name}", ("text",)):
        if record["text"] is not None:
            yield str(record["text"])


def _json_texts(path: Path, name: str) -> Iterator[str]:
    """The texts of a ``.json`` file: JSON lines, or one JSON array of records, which is parsed whole (a file that
    is one JSON value cannot be read a part at a time without a streaming parser; such files are small)."""
    with path.open(encoding="utf-8-sig") as handle:
        start = ""
        while not start and (chunk := handle.read(4096)):
            start = chunk.lstrip()[:1]
    if start != "[":
        yield from _jsonl_texts(path, name)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise CalibrationError(f"dataset file {name} is not valid JSON ({err.msg}, line {err.lineno})") from None
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "text" not in record:
            raise CalibrationError(f"dataset file {name}: record {number} needs a \"text\" field")
        if record["text"] is not None:
            yield str(record["text"])
