"""Model: where each residual delta is in every supported family, loading, and surgery.

Takes a model directory; hands on a loaded transformers model on its device and dtype (`loading`),
with an adapter that says, per layer, where the residual input and the attention and MLP deltas are
and how they combine (`adapters`), and the context managers and in-place twins that take modules
out of it (`surgery`).

May import: the edges (`errors`, `paths`).
"""

from .adapters import ADAPTERS, adapter_for_type, locate
from .loading import load_model, load_pruned, load_tokenizer

__all__ = ["ADAPTERS", "adapter_for_type", "load_model", "load_pruned", "load_tokenizer", "locate"]
