"""Local calibration text: Python's bundled documentation, plain text and JSON-lines files, read a piece at a time."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import CalibrationError, one_line

PIECE_CHARS = 65_536
"""A document longer than this is tokenized in pieces of whole lines of about this many characters, so that a text
of any size never sits in the tokenizer at once (a 20 MB text took 3.8 GB whole). A byte-level BPE tokenizer gives
the same tokens in pieces as whole; one that marks the start of a text (SentencePiece's prefix space) gives one
such mark per piece, so such a document's calibration id differs from a whole-text tokenization."""


READ_ERRORS = (OSError, ValueError)
"""What reading a damaged or cut-short file raises: bad UTF-8 (a ValueError), a compressed stream cut short or
damaged (pyarrow's OSError), a damaged parquet file (pyarrow's ArrowInvalid, a ValueError)."""


def pydoc_documents() -> list[str]:
    """The topic pages of the running Python's bundled documentation, in a fixed order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise CalibrationError(
            "the default calibration text needs the standard library's pydoc_data module, which this "
            "Python lacks; pass --calibration with a .txt or .jsonl file"
        ) from err
    return [topics[key] for key in sorted(topics)]


def _jsonl_records(path: Path, label: str, fields: tuple[str, ...] = ("text", "input_ids")) -> Iterator[dict]:
    """The records of a jsonl file (decompressed as its name says: .gz, .zst, ... as pyarrow detects them), read a line
    at a time; each must be an object with one of `fields`."""
    import pyarrow as pa

    with io.TextIOWrapper(pa.input_stream(str(path), compression="detect"), encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{label}:{number} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not (set(fields) & record.keys()):
                raise CalibrationError(f"{label}:{number} needs a {' or '.join(map(json.dumps, fields))} field")
            yield record


def _unreadable(path: str | Path, err: BaseException | str) -> CalibrationError:
    return CalibrationError(f"cannot read calibration file {str(path)!r}: {one_line(err)}")


class TextFile:
    """A plain-text file as one document: its text in chunks, read each time it is iterated, never whole."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[str]:
        read = 0
        try:
            with self.path.open(encoding="utf-8") as handle:
                while chunk := handle.read(PIECE_CHARS):
                    read += len(chunk)
                    yield chunk
        except UnicodeDecodeError as err:  # its position is within the bytes being decoded, not the file
            raise _unreadable(self.path, f"not UTF-8 (byte 0x{err.object[err.start]:02x} a little after character "
                                         f"{read:,})") from err
        except OSError as err:
            raise _unreadable(self.path, err) from err


def _chunks(document: str | TextFile) -> Iterator[str]:
    """A document's text in chunks: a string in slices of PIECE_CHARS, a file as it reads."""
    if isinstance(document, str):
        return (document[i:i + PIECE_CHARS] for i in range(0, len(document), PIECE_CHARS))
    return iter(document)


def _has_text(document: str | TextFile) -> bool:
    return any(chunk.strip() for chunk in _chunks(document))


def _cuttable(document: str, newline: int) -> bool:
    """A piece may end at this newline: the next line starts with no whitespace, so that a tokenizer splitting on
    whitespace runs (byte-level BPE) cuts there anyway."""
    return newline + 1 < len(document) and not document[newline + 1].isspace()


def _pieces(document: str | TextFile | Iterable[str]) -> Iterator[str]:
    """The document (a string, or its text in chunks as a `TextFile` reads it), whole when short, else in pieces of
    whole lines of up to PIECE_CHARS (longer where no line within starts without whitespace), each ending before a
    line that starts with a non-space character. Memory holds about a piece beyond the document's chunks."""
    chunks = _chunks(document)
    text, ended, given = "", False, False

    def fill(size: int) -> bool:
        """Read on until the text holds `size` characters; False where the document ends first."""
        nonlocal text, ended
        parts, have = [text], len(text)
        while not ended and have < size:
            chunk = next(chunks, None)
            if chunk is None:
                ended = True
            else:
                parts.append(chunk)
                have += len(chunk)
        text = "".join(parts)
        return have >= size

    while fill(PIECE_CHARS + 1):
        cut = text.rfind("\n", 0, PIECE_CHARS)
        while cut >= 0 and not _cuttable(text, cut):
            cut = text.rfind("\n", 0, cut)
        if cut < 0:  # none within: the first place after it
            at = PIECE_CHARS
            while True:
                cut = text.find("\n", at)
                if cut < 0:
                    at = len(text)
                    fill(2 * at)  # doubling: a long run without a place to cut is read in linear time
                    if len(text) == at:
                        break
                else:
                    if cut + 1 == len(text):  # the next character decides; doubling keeps a long run linear
                        fill(2 * len(text))
                    if _cuttable(text, cut):
                        break
                    at = cut + 1
            if cut < 0:
                break
        yield text[:cut + 1]
        given, text = True, text[cut + 1:]
    if text or not given:
        yield text


LOCAL_JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")
"""Local calibration files read as JSON lines ({"text": ...} or {"input_ids": [...]} per line), compressed too."""


class LocalTexts:
    """The texts of a local JSON-lines file, read a line at a time each time they are iterated, so that a file of any
    size is tokenized in bounded memory."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> Iterator[dict]:
        return _jsonl_records(self.path, str(self.path))

    def __iter__(self) -> Iterator[str]:
        try:
            for record in self.records():
                if record.get("text") is not None:  # as a Hub dataset's: a null text is no document
                    yield str(record["text"])
        except CalibrationError:
            raise
        except READ_ERRORS as err:
            raise _unreadable(self.path, err) from err


def _token_list(ids, path: Path, number: int) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CalibrationError(f"{path} record {number}: input_ids must be a list of integers")
    return ids
