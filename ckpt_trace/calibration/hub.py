"""A Hugging Face dataset's texts, read lazily, downloading only the files a draw needs."""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import CalibrationError, ConfigError, one_line
from ..fetch.hub import hub_errors
from ..paths import json_object
from .local import READ_ERRORS, _jsonl_records

log = logging.getLogger(__name__)

HUB_POOL = 64
"""Blocks per sample that a Hub dataset split is drawn from: its first ``HUB_POOL * samples`` blocks, files in name
order, so that only the files holding those are downloaded (a local file is drawn from whole)."""

HUB_BATCH_ROWS = 1024
"""Rows of a dataset file read at a time."""


class HubTexts:
    """The ``text`` column of one split of a Hugging Face dataset (``hf:REPO[:CONFIG][:SPLIT]``), read lazily.

    The split's parquet or JSON-lines files are listed once, at the dataset's current commit (remembered under
    ckpt-trace's home, so that ``HF_HUB_OFFLINE`` reads the same files at the same commit from the cache); iterating
    downloads each file only when the texts reach it, and reads it a batch of rows at a time, so that memory holds
    one batch and the draw downloads only the files it needs. Iterable again: later passes read the cached files.

    Where the dataset's README declares its configs (``configs:``, each a ``config_name`` with ``data_files`` and
    ``data_dir``), the files are chosen as ``datasets`` chooses them (see `_declared_files`), and a spec that names
    no config takes the default one. Else the files are found by their names: a config is a folder, a split a word
    of the path; a spec that names no split, over files that name none (``data/CC-MAIN-2024-10/000_00000.parquet``),
    takes every file of the config; a spec that names no config, over a split in several, is an error that names
    them.
    """

    def __init__(self, spec: str):
        parts = spec.removeprefix("hf:").split(":")
        if not parts[0] or len(parts) > 3:
            raise ConfigError(f"bad dataset spec {spec!r}; expected hf:REPO[:CONFIG][:SPLIT]")
        self.repo, config = parts[0], (parts[1] if len(parts) > 1 else "")
        split = parts[2] if len(parts) > 2 else None
        self.commit, names = self._listing()
        declared, entries = self._declared_configs(names)
        if declared:
            config = config or self._default_config(declared, entries, split)
            if config not in declared:
                raise CalibrationError(f"dataset {self.repo!r} has no config {config!r}; its README declares: "
                                       f"{_some(list(declared))}")
            self.files = self._declared_files(config, declared[config], names, split)
            return
        prefix = f"{config}/" if config else ""
        self.files = self._named_files(names, prefix, split, config)
        folders = sorted({n.split("/")[0] if "/" in n else "" for n in self.files})
        if not config and len(folders) > 1:
            named = split or "train"
            raise CalibrationError(f"dataset {self.repo!r} has {named} files in several configs ("
                                   f"{', '.join(f or '(top level)' for f in folders)}); name one, as "
                                   f"hf:{self.repo}:{folders[-1]}:{named}")

    def _named_files(self, names: list[str], prefix: str, split: str | None, config: str) -> list[str]:
        """For a dataset whose README declares no configs: the parquet and JSON-lines files under `prefix` whose
        paths name the split (train where none is given), in name order; where none is given and no file names a
        split, all of them."""
        texts = sorted(n for n in names if n.startswith(prefix) and n.endswith(DATASET_FILES))
        named = split or "train"
        files = [n for n in texts if _names_split(n.removeprefix(prefix), named)]
        if not files and split is None and not any(_names_split(n.removeprefix(prefix), s) for n in texts for s in SPLITS):
            files = texts  # files that name no split: the config's one split
        if not files:
            have = [n for n in names if n.endswith(DATASET_FILES)]
            raise CalibrationError(f"dataset {self.repo!r} has no parquet or JSON-lines files for split {named!r}"
                                   f"{f' of config {config!r}' if config else ''}; its parquet and JSON-lines "
                                   f"files: {_some(have) if have else 'none'}")
        return files

    def _declared_configs(self, names: list[str]) -> tuple[dict[str, list[dict]], int]:
        """The configs declared in the README's YAML header at the commit, as {config: its entries} (one each, where
        the README is well made), and how many entries ``configs:`` holds (with those that name no config); ({}, 0)
        where the README declares none as a list of entries (an older card lists only names: its files are then
        found by name). Config and split names are read as written (YAML reads ``2020`` as a number, ``no`` as
        false)."""
        import yaml
        from huggingface_hub.repocard import REGEX_YAML_BLOCK

        if "README.md" not in names:
            return {}, 0
        try:
            block = REGEX_YAML_BLOCK.search(self._download("README.md").read_text(encoding="utf-8-sig"))
            header = yaml.safe_load(block.group(2)) if block else None
            written = yaml.load(block.group(2), Loader=yaml.BaseLoader) if block else None  # every scalar a str
        except CalibrationError:
            raise
        except (yaml.YAMLError, ValueError, RecursionError, OSError) as err:  # a header that does not parse, a bad date
            raise CalibrationError(f"cannot read the configs in README.md of dataset {self.repo!r}: "
                                   f"{one_line(err)}") from err
        entries = header.get("configs") if isinstance(header, dict) else None
        if not isinstance(entries, list) or not any(isinstance(e, dict) for e in entries):
            return {}, 0
        entries = _as_written(entries, written.get("configs"))
        configs: dict[str, list[dict]] = {}
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("config_name"), str):
                configs.setdefault(entry["config_name"], []).append(entry)
        return configs, sum(isinstance(e, dict) for e in entries)

    def _default_config(self, declared: dict[str, list[dict]], entries: int, split: str | None) -> str:
        """The config a spec that names none takes, as ``datasets`` picks it: the one marked ``default: true``, or
        named ``default``, or the only one; several such are an error."""
        defaults = [name for name, listed in declared.items()
                    if entries == 1 or name == "default" or any(e.get("default") for e in listed)]
        tail = f":{split}" if split is not None else ""
        if len(defaults) > 1:
            raise CalibrationError(f"dataset {self.repo!r} has several default configs ({_some(defaults)}); name "
                                   f"one, as hf:{self.repo}:{defaults[0]}{tail}")
        if not defaults:
            raise CalibrationError(f"dataset {self.repo!r} declares several configs and no default "
                                   f"({_some(list(declared))}); name one, as hf:{self.repo}:{next(iter(declared))}"
                                   f"{tail}")
        return defaults[0]

    def _declared_files(self, config: str, entries: list[dict], names: list[str], split: str | None) -> list[str]:
        """The readable files of a split of a config that the README declares, in name order, chosen as ``datasets``
        chooses them: those its ``data_files`` patterns match (see `_glob_match`), under its ``data_dir`` where it
        has one; with no ``data_files``, the splits are inferred from the names of the files under its
        ``data_dir`` (see `_inferred_splits`). Files that describe the dataset (`CARD_FILES`) are never rows,
        unless a pattern names one."""
        label = f"config {config!r} of dataset {self.repo!r}"
        if len(entries) > 1:
            raise CalibrationError(f"README.md of dataset {self.repo!r} declares config {config!r} {len(entries)} "
                                   "times, so which files it reads is not clear")
        entry = entries[0]
        data_dir = entry.get("data_dir")
        if data_dir is not None and not isinstance(data_dir, str):
            raise CalibrationError(f"the data_dir of {label} is not a folder: {data_dir!r}")
        folder = posixpath.normpath(data_dir.strip("/")) if data_dir else "."
        base = "" if folder == "." else f"{folder}/"
        if entry.get("data_files") is None:
            splits = _inferred_splits([n.removeprefix(base) for n in names if n.startswith(base)])
            files = {name: [base + n for n in listed] for name, listed in splits.items()}
            where = f"under its data_dir {data_dir!r}" if base else "in the dataset"
        else:
            patterns = {name: [base + p.removeprefix("./") for p in listed]
                        for name, listed in _split_patterns(entry["data_files"], label).items()}
            files = {name: sorted(n for n in names if any(_glob_match(p, n, label) for p in listed))
                     for name, listed in patterns.items()}
            where = ""
        named = split or "train"
        if named not in files:
            raise CalibrationError(f"{label} has no split {named!r}; its splits{' ' + where if where else ''}: "
                                   f"{', '.join(files) or 'none'}")
        readable = [n for n in files[named] if n.endswith(DECLARED_FILES)]
        if not readable:
            shown = f"its README's {', '.join(map(repr, patterns[named]))} match" if not where else f"its files {where}:"
            raise CalibrationError(f"split {named!r} of {label} has no file that calibration reads "
                                   f"({', '.join(DECLARED_FILES)}): {shown} {_some(files[named]) or 'no file'}")
        return readable

    def _download(self, name: str) -> Path:
        """One file of the dataset at the listed commit, from the cache where it is there."""
        from huggingface_hub import constants, hf_hub_download

        try:
            return Path(hf_hub_download(self.repo, name, repo_type="dataset", revision=self.commit))
        except hub_errors() as err:
            if constants.HF_HUB_OFFLINE:
                raise CalibrationError(f"{name} of dataset {self.repo!r} (commit {self.commit[:12]}) is not in "
                                       "the cache, and HF_HUB_OFFLINE is set; read the dataset once online to "
                                       "cache it") from err
            raise CalibrationError(f"cannot fetch {name} of dataset {self.repo!r}: {one_line(err)}") from err

    def _listing(self) -> tuple[str, list[str]]:
        """The dataset's commit and files: from the Hub, remembered for offline use; offline, the remembered ones
        where the cache holds that commit, else the cache's copy of the main branch (as huggingface_hub left it)."""
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.file_download import repo_folder_name

        from ..paths import atomic_write_bytes, home

        folder = self.repo.replace("/", "--")
        record = home() / "datasets" / f"{folder}.json"
        if constants.HF_HUB_OFFLINE:
            try:
                listing = json_object(record)
                commit, files = str(listing["commit"]), list(listing["files"])
                cached = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=self.repo, repo_type="dataset")
                snapshots = cached / "snapshots"
                if (snapshots / commit).is_dir():
                    return commit, files
            except (OSError, ValueError, KeyError, TypeError):
                pass
            try:
                local = Path(snapshot_download(self.repo, repo_type="dataset"))
            except hub_errors() as err:
                raise CalibrationError(f"dataset {self.repo!r} is not in the cache, and HF_HUB_OFFLINE is set") from err
            return local.name, sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        try:
            info = HfApi().dataset_info(self.repo, revision="main")
        except hub_errors() as err:  # the client raises several classes for one cause: unreachable or unknown
            raise CalibrationError(f"cannot fetch dataset {self.repo!r}: {one_line(err)}") from err
        files = sorted(s.rfilename for s in info.siblings or [])
        try:
            atomic_write_bytes(record, json.dumps({"commit": info.sha, "files": files}).encode())
        except OSError as err:  # a memo for offline use only
            log.warning("cannot remember the files of dataset %r for offline use: %s", self.repo, err)
        return info.sha, files

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


DATASET_FILES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst")
"""The files of a Hub dataset that calibration reads: parquet, and JSON lines, gzipped (C4's ``.json.gz``) or
zstd-compressed (the Pile's ``.jsonl.zst``) too."""

DECLARED_FILES = (*DATASET_FILES, ".json")
"""The files that calibration reads where a README's configs name them: those, and ``.json`` (JSON lines, or one
JSON array of records), which is left out of the search by name, where it is mostly metadata."""

SPLITS = ("train", "validation", "test", "dev", "valid")
"""Words that name a split in a dataset's file names."""


def _names_split(name: str, split: str) -> bool:
    """Whether a file's path names the split, as a word of its own (``train-00000-of-00001.parquet``,
    ``c4-validation.00000-of-00008.json.gz``, ``train/0.parquet``; not ``pretrain_mix/`` or ``invalid.parquet``)."""
    return re.search(rf"(?:^|[/_.-]){re.escape(split)}(?:[/_.-]|$)", name) is not None


def _split_patterns(data_files, label: str) -> dict[str, list[str]]:
    """A config's ``data_files`` as {split: [patterns]}: a pattern or a list of them (the train split), or a list
    of ``{split, path}`` whose path is a pattern or a list of them."""
    def patterns(value, where: str) -> list[str]:
        listed = [value] if isinstance(value, str) else value
        if not isinstance(listed, list) or not listed or not all(isinstance(p, str) for p in listed):
            raise CalibrationError(f"the data_files of {label} {where}are not file patterns: {value!r}; give a pattern, "
                                   "a list of them, or a list of {split, path}")
        return listed

    if isinstance(data_files, list) and data_files and all(isinstance(e, dict) for e in data_files):
        splits: dict[str, list[str]] = {}
        for entry in data_files:
            if entry.get("split") is None:
                raise CalibrationError(f"the data_files of {label} have an entry with no split: {entry!r}")
            split = str(entry["split"])  # YAML reads `split: 2020` as a number
            if entry.get("path") is None:
                raise CalibrationError(f"the data_files of {label} give split {split!r} no path")
            if split in splits:
                raise CalibrationError(f"the data_files of {label} give split {split!r} twice")
            splits[split] = patterns(entry["path"], f"for split {split!r} ")
        return splits
    return {"train": patterns(data_files, "")}


CARD_FILES = frozenset({"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json",
                        "dummy_data.zip"})
"""Files of a dataset repo that describe it and never hold its rows, unless a data_files pattern names one."""


def _glob_match(pattern: str, name: str, label: str = "") -> bool:
    """Whether a repo path matches a data_files pattern, as ``datasets`` matches them (see `_glob_regex`); a file of
    `CARD_FILES` matches only a pattern that names it."""
    components = pattern.removeprefix("./").split("/")
    if any("**" in c and c != "**" for c in components):
        raise CalibrationError(f"data_files pattern {pattern!r}{f' of {label}' if label else ''}: ** must be a whole "
                               "path component, as in data/**/*.parquet")
    file = name.rsplit("/", 1)[-1]
    return (file not in CARD_FILES or components[-1] == file) and _glob_regex(pattern).fullmatch(name) is not None


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    """A data_files pattern as a regex over repo paths, with fsspec's rules: a component of ``**`` matches any
    number of folders (at the end, one file or more, in any folders); within a component, ``*``, ``?``, ``[...]``
    and ``[!...]`` as in fnmatch, never across a ``/``. A hidden file or folder (``.x``), or a special folder
    (``__x``), matches only a pattern component that starts the same way, as ``datasets`` filters them."""
    components = pattern.removeprefix("./").split("/")
    pieces = []
    for i, component in enumerate(components):
        last = i == len(components) - 1
        if component == "**":
            pieces.append(r"(?:(?!\.|__)[^/]+/)*" + (r"(?!\.)[^/]+" if last else ""))
            continue
        guard = ("" if component.startswith(".") else r"(?!\.)") + ("" if last or component.startswith("__") else "(?!__)")
        pieces.append(guard + _component_regex(component) + ("" if last else "/"))
    return re.compile("".join(pieces))


def _component_regex(component: str) -> str:
    """One path component's glob as a regex that never matches a ``/``."""
    out, i = [], 0
    while i < len(component):
        char = component[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            start = i + 1 + (component[i + 1:i + 2] == "!")
            close = component.find("]", start + (component[start:start + 1] == "]"))
            if close < 0:
                out.append(re.escape(char))
            else:
                body = re.sub(r"([\\\[&~|^])", r"\\\1", component[start:close])
                out.append(f"[^/{body}]" if start > i + 1 else f"[{body}]")
                i = close
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
"""The words that name each split in the file and folder names ``datasets`` infers splits from."""

_SEP = "[-._ 0-9]"


def _inferred_splits(names: list[str]) -> dict[str, list[str]]:
    """The splits of a folder's files as ``datasets`` infers them where a config declares no data_files, each with
    its files in name order: shards named ``data/SPLIT-00000-of-00003...``; else folders, then file names, that hold
    a split's word (``train/``, ``dev.jsonl``, ``my_test-1.json``); else every file is train. (``datasets`` also
    knows Inspect logs, ``*.eval``, as a split named logs, and Harbor tasks as a test split: so does this.)"""
    names = sorted(n for n in names if n.rsplit("/", 1)[-1] not in CARD_FILES)
    shards: dict[str, list[str]] = {}
    for n in names:
        if (found := re.fullmatch(r"data/([^/]+)-\d{5}-of-\d{5}[^/]*\.[^/]*", n)) and _glob_match("data/*", n):
            shards.setdefault(found[1], []).append(n)
    if shards:
        return shards
    in_folders = ("**/{w}/**", "**/{w}" + _SEP + "*/**", "**/*" + _SEP + "{w}/**", "**/*" + _SEP + "{w}" + _SEP + "*/**")
    in_files = ("**/{w}" + _SEP + "*", "**/*" + _SEP + "{w}" + _SEP + "*")
    by_word = lambda shapes: {split: [s.format(w=w) for w in words for s in shapes]  # noqa: E731
                              for split, words in SPLIT_KEYWORDS.items()}
    for patterns in ({"logs": ["**/*.eval"]}, {"test": ["**/task.toml", "**/instruction.md"]},  # as datasets has them
                     by_word(in_folders), by_word(in_files), {"train": ["**"]}):
        splits = {split: [n for n in names if any(_glob_regex(p).fullmatch(n) for p in listed)]
                  for split, listed in patterns.items()}
        if any(splits.values()):
            return {split: files for split, files in splits.items() if files}
    return {"train": []}


def _as_written(typed, written):
    """`typed` (YAML read as usual) with each ``config_name`` and ``split`` as `written` (YAML read with every
    scalar a string) spells it, where the two have the same shape."""
    if isinstance(typed, list) and isinstance(written, list) and len(typed) == len(written):
        return [_as_written(t, w) for t, w in zip(typed, written)]
    if isinstance(typed, dict) and isinstance(written, dict):
        return {key: written[key] if key in ("config_name", "split") and isinstance(written.get(key), str)
                and value is not None else _as_written(value, written.get(key)) for key, value in typed.items()}
    return typed


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
