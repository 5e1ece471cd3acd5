"""ckpt-trace: which layers of a Transformer matter, checkpoint by checkpoint."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ckpt-trace")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .calibration import CalibrationSet, CalibrationSpec, load_calibration  # noqa: E402
from .models import load_pruned  # noqa: E402
from .pruning import PruneConfig, prune  # noqa: E402
from .scan import ScanConfig, scan  # noqa: E402
from .scoring import score  # noqa: E402
from .store import Store, load_scores  # noqa: E402

__all__ = [
    "CalibrationSet",
    "CalibrationSpec",
    "PruneConfig",
    "ScanConfig",
    "Store",
    "__version__",
    "load_calibration",
    "load_pruned",
    "load_scores",
    "prune",
    "scan",
    "score",
]
