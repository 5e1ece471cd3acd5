"""Calibration sets: fixed token blocks, identical for every checkpoint of a scan.

A spec names where the text comes from:

- ``pydoc`` (the default): the documentation that ships with every CPython
  installation (``pydoc_data.topics``), read at run time;
- a plain text file: one document, read a chunk at a time;
- a jsonl file (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) whose lines hold ``{"text": ...}``: one
  document per line, read a line at a time;
- a jsonl file whose lines hold ``{"input_ids": [...]}``: pre-tokenized, used verbatim
  (lengths may differ; padding is masked when batched);
- ``hf:REPO[:CONFIG][:SPLIT]``: a Hugging Face dataset's ``text`` column, where the network allows;
  the blocks are drawn from the split's first ``HUB_POOL`` blocks per sample, and only the
  files that hold those are downloaded.

Text is tokenized as the model saw it in training: documents are joined with EOS (a
tokenizer without one is an error for more than one document, since the documents would
run together), cut into blocks of ``seq_len`` tokens, each block beginning with BOS where
the tokenizer's template puts BOS before a text (Llama, Gemma, OLMo-2), and ``samples``
blocks are chosen with ``seed``. The set is identified by a short hash of its token ids,
BOS included, stored beside every score.

Takes a spec and the model's tokenizer; hands on a `CalibrationSet`. `sets` holds the spec and the
set, `local` reads local text, `hub` a Hugging Face dataset, and `blocks` turns documents into drawn
blocks.

May import: the edges (`errors`, `paths`).
"""

from .blocks import heldout_set, load_calibration
from .local import pydoc_documents
from .sets import DEFAULT_SEQ_LEN, DEFAULT_SPEC, CalibrationSet, CalibrationSpec, fit_seq_len

__all__ = ["DEFAULT_SEQ_LEN", "DEFAULT_SPEC", "CalibrationSet", "CalibrationSpec", "fit_seq_len", "heldout_set",
           "load_calibration", "pydoc_documents"]
