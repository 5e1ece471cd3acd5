"""Testing: a loopback HTTP server that answers like the Hugging Face Hub, for tests and benchmarks.

Takes folders of checkpoints; hands on a running server on 127.0.0.1 that the real huggingface_hub
client downloads from. Nothing in the library imports it.

May import: nothing of ckpt-trace.
"""

from .loopback_hub import LoopbackHub

__all__ = ["LoopbackHub"]
