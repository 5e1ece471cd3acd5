"""Fetch: where checkpoints come from, what they are called, and which weights they hold.

Takes a source (a Hub repo id, a model directory, or a directory of revision folders) and a
selection; hands on `Checkpoint` records in training order, each fetched to a local folder on
request and released after use. Revision names are parsed and ordered here (`revisions`), weights
are fingerprinted (`identity`), the Hub is reached through huggingface_hub (`hub`), and what
ckpt-trace downloaded into a Hugging Face cache is remembered so that only that is evicted (`cache`).

May import: the edges (`errors`, `paths`).
"""

from .revisions import Revision, parse_revision, place, select
from .sources import Checkpoint, open_source, revision_table

__all__ = ["Checkpoint", "Revision", "open_source", "parse_revision", "place", "revision_table", "select"]
