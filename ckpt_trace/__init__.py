"""ckpt-trace: which layers of a Transformer matter, checkpoint by checkpoint.

The package follows the data flow, one subpackage per stage: `fetch` (sources, revision names,
weights identity, the Hub), `calibration`, `microsuite`, `model` (adapters, loading, surgery),
`scoring`, `scan`, `pruning`, `evaluation`, `analysis`; `errors`, `paths`, `store` and `cli` are the
edges. Each stage imports only the stages before it.
"""

from .calibration import CalibrationSet, CalibrationSpec, load_calibration
from .model import load_model, load_pruned
from .pruning import PruneConfig, prune
from .scan import ScanConfig, scan
from .scoring import score
from .store import VERSION as __version__
from .store import Store, load_scores

__all__ = [
    "CalibrationSet",
    "CalibrationSpec",
    "PruneConfig",
    "ScanConfig",
    "Store",
    "__version__",
    "load_calibration",
    "load_model",
    "load_pruned",
    "load_scores",
    "prune",
    "scan",
    "score",
]
