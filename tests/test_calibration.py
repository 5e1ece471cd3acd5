"""Calibration sets: sources, block drawing, ids, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, write_jsonl
from transformers import AutoTokenizer

from ckpt_trace.calibration.blocks import load_calibration
from ckpt_trace.calibration.local import pydoc_documents
from ckpt_trace.calibration.sets import CalibrationSet, CalibrationSpec
from ckpt_trace.errors import CalibrationError, ConfigError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_text_file_is_joined_with_eos_cut_and_sampled(tmp_path, tokenizer):
    docs = ["alpha beta gamma delta " * 30, "one two three four " * 40]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    spec = CalibrationSpec(str(path), samples=4, seq_len=16, seed=7)
    calibration = load_calibration(spec, tokenizer)

    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i * 16 : (i + 1) * 16] for i in range(len(stream) // 16)]
    import random

    chosen = sorted(random.Random(7).sample(range(len(blocks)), 4))
    assert [s.tolist() for s in calibration.sequences] == [blocks[i] for i in chosen]
    assert calibration.n_tokens == 64


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_gives_the_blocks_of_the_plain_file(tmp_path, tokenizer, suffix):
    import gzip

    import pyarrow as pa

    docs = [f"document {n}: " + "alpha beta gamma " * (5 + n) for n in range(40)]
    plain = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    packed = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl.gz":
        packed.write_bytes(gzip.compress(plain.read_bytes()))
    else:
        with pa.CompressedOutputStream(str(packed), "zstd") as out:
            out.write(plain.read_bytes())
    spec = dict(samples=8, seq_len=16, seed=3)
    want = load_calibration(CalibrationSpec(str(plain), **spec), tokenizer)
    got = load_calibration(CalibrationSpec(str(packed), **spec), tokenizer)
    assert [s.tolist() for s in got.sequences] == [s.tolist() for s in want.sequences] and got.id == want.id

    # Read a line at a time as the blocks are drawn: a bad line far into the file is found then, named by its number.
    bad = tmp_path / "late.jsonl"
    bad.write_text(plain.read_text() + "not json\n")
    from ckpt_trace.calibration.blocks import read_source

    assert len(list(iter(read_source(str(plain))))) == 40 and not isinstance(read_source(str(bad)), list)
    with pytest.raises(CalibrationError, match=r"late.jsonl:41 is not valid JSON"):
        load_calibration(CalibrationSpec(str(bad), **spec), tokenizer)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(CalibrationError, match=f"cannot read calibration file '.*cut{suffix}'"):
        load_calibration(CalibrationSpec(str(cut), **spec), tokenizer)


def test_same_spec_same_id_other_seed_other_id(tokenizer):
    a = load_calibration(CalibrationSpec("pydoc", samples=8, seq_len=32, seed=0), tokenizer)
    b = load_calibration(CalibrationSpec("pydoc", samples=8, seq_len=32, seed=0), tokenizer)
    c = load_calibration(CalibrationSpec("pydoc", samples=8, seq_len=32, seed=1), tokenizer)
    assert a.id == b.id != c.id
    assert len(a.id) == 12


def test_id_depends_on_ids_and_their_split():
    assert CalibrationSet.from_ids([[1, 2], [3]]).id != CalibrationSet.from_ids([[1], [2, 3]]).id
    assert CalibrationSet.from_ids([[1, 2, 3]], "x").id == CalibrationSet.from_ids([[1, 2, 3]], "y").id


def test_default_text_is_read_from_the_python_installation():
    from pydoc_data.topics import topics

    docs = pydoc_documents()
    assert docs == [topics[k] for k in sorted(topics)]
    assert sum(map(len, docs)) > 100_000


def test_plain_text_file(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    calibration = load_calibration(CalibrationSpec(str(path), samples=3, seq_len=20), tokenizer)
    assert len(calibration.sequences) == 3 and all(len(s) == 20 for s in calibration.sequences)


def test_pretokenized_jsonl_is_used_verbatim(tmp_path):
    records = [{"input_ids": [5, 6, 7]}, {"input_ids": [1]}, {"input_ids": [9, 8, 7, 6, 5]}]
    path = write_jsonl(tmp_path / "ids.jsonl", records)
    calibration = load_calibration(str(path))
    assert [s.tolist() for s in calibration.sequences] == [r["input_ids"] for r in records]


def test_batches_are_right_padded_with_a_mask():
    calibration = CalibrationSet.from_ids([[1, 2], [3, 4, 5], [6]])
    (ids, mask), (ids2, mask2) = list(calibration.batches(2))
    assert ids.tolist() == [[3, 4, 5], [1, 2, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids2.tolist() == [[6]] and mask2.tolist() == [[1]]


def test_too_few_blocks_uses_all_and_warns(tmp_path, tokenizer, caplog):
    path = tmp_path / "short.txt"
    path.write_text("word " * 100)
    calibration = load_calibration(CalibrationSpec(str(path), samples=1000, seq_len=10), tokenizer)
    assert 0 < len(calibration.sequences) < 1000
    assert "using all of them" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no text"),
        ("   \n  ", "no text"),
        ("hi", "fewer than one block"),
    ],
)
def test_bad_text_files(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(CalibrationSpec(str(path), seq_len=64), tokenizer)


def test_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_ids": [1, 2]}\nnot json\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2 is not valid JSON"):
        load_calibration(str(path))
    path.write_text('{"input_ids": [1, "a"]}\n')
    with pytest.raises(CalibrationError, match="list of integers"):
        load_calibration(str(path))
    path.write_text('{"other": 1}\n')
    with pytest.raises(CalibrationError, match='needs a "text" or "input_ids" field'):
        load_calibration(str(path))


def test_unreadable_file(tmp_path, tokenizer):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(CalibrationError, match="cannot read calibration file"):
        load_calibration(str(path), tokenizer)


def test_missing_file_names_valid_choices(tmp_path):
    with pytest.raises(CalibrationError, match="not a file; use 'pydoc'"):
        load_calibration(str(tmp_path / "nope.txt"))


def test_text_without_tokenizer():
    with pytest.raises(CalibrationError, match="has no tokenizer"):
        load_calibration("pydoc", None)


def test_out_of_vocabulary_ids():
    calibration = CalibrationSet.from_ids([[1, VOCAB + 5]])
    with pytest.raises(CalibrationError, match=f"token id {VOCAB + 5}, outside the model's vocabulary 0..{VOCAB - 1}"):
        calibration.check_vocab(VOCAB)
    with pytest.raises(CalibrationError, match="token id -1"):
        CalibrationSet.from_ids([[-1, 2]]).check_vocab(VOCAB)


@pytest.mark.parametrize("kwargs", [dict(samples=0), dict(seq_len=1)])
def test_bad_spec_numbers(kwargs):
    with pytest.raises(ConfigError):
        CalibrationSpec(**kwargs)


def test_empty_sequence_rejected():
    with pytest.raises(CalibrationError, match="empty"):
        CalibrationSet((torch.tensor([], dtype=torch.int64),))


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    from conftest import write_tokenizer

    path = tmp_path_factory.mktemp("bos-tokenizer")
    write_tokenizer(path, bos=True)
    return AutoTokenizer.from_pretrained(path)


def test_blocks_begin_with_bos_where_the_template_puts_it(tmp_path, tokenizer, bos_tokenizer):
    import random

    docs = ["alpha beta gamma delta " * 30, "one two three four " * 40]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    spec = CalibrationSpec(str(path), samples=4, seq_len=16, seed=7)
    bos = bos_tokenizer.bos_token_id
    assert bos_tokenizer("x")["input_ids"][0] == bos  # what the model saw in training
    calibration = load_calibration(spec, bos_tokenizer)
    stream = []
    for d in docs:
        stream += bos_tokenizer(d, add_special_tokens=False)["input_ids"] + [bos_tokenizer.eos_token_id]
    blocks = [[bos] + stream[i * 15 : (i + 1) * 15] for i in range(len(stream) // 15)]
    chosen = sorted(random.Random(7).sample(range(len(blocks)), 4))
    assert [s.tolist() for s in calibration.sequences] == [blocks[i] for i in chosen]
    assert "each after BOS" in calibration.source
    # Without BOS in the template, no block begins with one, and the id tells the two sets apart.
    plain = load_calibration(spec, tokenizer)
    assert all(len(s) == 16 for s in plain.sequences) and plain.id != calibration.id


def test_a_tokenizer_without_eos_cannot_join_documents(tmp_path):
    from conftest import write_tokenizer

    write_tokenizer(tmp_path / "tok", eos=False)
    no_eos = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert no_eos.eos_token_id is None
    with pytest.raises(CalibrationError, match="no EOS token to end each of the documents"):
        load_calibration(CalibrationSpec("pydoc", samples=2, seq_len=16), no_eos)
    one = tmp_path / "one.txt"
    one.write_text("a single document, long enough to cut " * 20)
    assert len(load_calibration(CalibrationSpec(str(one), samples=2, seq_len=16), no_eos).sequences) == 2


def test_a_long_text_is_tokenized_in_pieces_and_its_blocks_taken_in_two_passes(tmp_path, tokenizer, monkeypatch):
    from ckpt_trace.calibration import blocks, local

    monkeypatch.setattr(local, "PIECE_CHARS", 60)
    # One line longer than a piece, and indented lines, where no piece may end before them.
    lines = [f"line {i} says {'word ' * (i % 7)}" if i % 5 else f"   indented {i}" for i in range(200)] + ["x" * 150]
    text = "\n".join(lines) + "\n"
    pieces = list(local._pieces(text))
    assert "".join(pieces) == text and len(pieces) > 20
    assert all(p.endswith("\n") for p in pieces[:-1]) and all(not p[0].isspace() for p in pieces[1:])
    assert all(len(p) <= 60 or p.count("\n") <= 2 for p in pieces)
    # A byte-level BPE tokenizer gives the same tokens in pieces as for the whole text.
    assert blocks.token_stream([text], tokenizer)[:-1] == tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = blocks.token_stream([text, "tail text"], tokenizer)
    assert stream == [t for p in pieces for t in tokenizer(p, add_special_tokens=False)["input_ids"]] + \
        [tokenizer.eos_token_id] + tokenizer("tail text", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for width in (7, 16, 33):
        n_blocks, take = blocks.stream_blocks([text, "tail text"], tokenizer, width)
        assert n_blocks == len(stream) // width
        indices = [0, 3, 4, n_blocks // 2, n_blocks - 1]
        assert take(indices) == [stream[i * width:(i + 1) * width] for i in sorted(set(indices))]
    path = tmp_path / "long.txt"
    path.write_text(text)
    calibration = load_calibration(CalibrationSpec(str(path), samples=5, seq_len=16, seed=3), tokenizer)
    whole = blocks.token_stream([text], tokenizer)
    import random

    chosen = sorted(random.Random(3).sample(range(len(whole) // 16), 5))
    assert [s.tolist() for s in calibration.sequences] == [whole[i * 16:(i + 1) * 16] for i in chosen]


def _whole_text_pieces(document: str, size: int) -> list[str]:
    """The reference: pieces cut from the whole text at once (no chunks), by the rule `_pieces` documents."""
    def cuttable(i):
        return i + 1 < len(document) and not document[i + 1].isspace()

    pieces, start = [], 0
    while len(document) - start > size:
        cut = next((i for i in range(start + size - 1, start - 1, -1) if document[i] == "\n" and cuttable(i)), None)
        if cut is None:
            cut = next((i for i in range(start + size, len(document)) if document[i] == "\n" and cuttable(i)), None)
            if cut is None:
                break
        pieces.append(document[start:cut + 1])
        start = cut + 1
    if start < len(document) or not document:
        pieces.append(document[start:])
    return pieces


def test_a_text_read_in_chunks_is_cut_where_the_whole_text_is(tmp_path, tokenizer, monkeypatch):
    import random

    from ckpt_trace.calibration import blocks, local

    monkeypatch.setattr(local, "PIECE_CHARS", 16)
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\n", "  ", "\t", "word "]
    texts = ["", "\n", "\n\n\n", "x" * 50, "x" * 50 + "\n", ("y" * 20 + "\n ") * 5, "a\n" * 40, " " * 40 + "\nb"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(300)]
    for text in texts:
        want = _whole_text_pieces(text, 16)
        assert list(local._pieces(text)) == want, text
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] if text else []
        assert list(local._pieces(iter(chunks))) == want, (text, chunks)
    # A .txt file is read 16 characters at a time, never whole, and cut as the whole text is (\r\n read as \n).
    path = tmp_path / "t.txt"
    text = "".join(rng.choice(alphabet) for _ in range(5000))
    path.write_bytes(text.replace("\n", "\r\n").encode())
    document = blocks.read_source(str(path))[0]
    chunks = list(document)
    assert isinstance(document, local.TextFile) and "".join(chunks) == text
    assert len(chunks) == -(-len(text) // 16) and all(len(c) == 16 for c in chunks[:-1])
    assert list(local._pieces(document)) == _whole_text_pieces(text, 16)
    assert blocks.token_stream([document], tokenizer) == blocks.token_stream([text], tokenizer)


def test_a_damaged_file_is_one_line(tmp_path, tokenizer):
    import gzip
    import zlib

    text = "".join(f"line {n} of a long calibration text\n" for n in range(6000))
    raw = gzip.compress(write_jsonl(tmp_path / "docs.jsonl", [{"text": text[i:i + 500]} for i in range(0, len(text), 500)])
                        .read_bytes(), mtime=0)
    for at in range(10, len(raw)):  # a flipped byte that zlib itself reports (no OSError, no EOFError)
        damaged = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:]
        try:
            gzip.decompress(damaged)
        except zlib.error:
            break
        except (OSError, EOFError):
            continue
    else:
        pytest.fail("no damage that zlib reports")
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(damaged)
    spec = dict(samples=4, seq_len=16)
    with pytest.raises(CalibrationError, match=r"cannot read calibration file '.*damaged.jsonl.gz': .*\S$"):
        load_calibration(CalibrationSpec(str(path), **spec), tokenizer)
    # Bad UTF-8 far into a text file: the message says about where, counted from the start of the file.
    path = tmp_path / "late.txt"
    path.write_bytes(text.encode() + b"\xff" + text.encode())
    with pytest.raises(CalibrationError) as caught:
        load_calibration(CalibrationSpec(str(path), samples=100_000, seq_len=16), tokenizer)
    where = int(str(caught.value).split("after character ")[1].rstrip(")").replace(",", ""))
    assert "not UTF-8 (byte 0xff" in str(caught.value) and len(text) - 65_536 <= where <= len(text)
