"""Scan: score every selected revision of a suite and store its rows.

Takes a `ScanConfig`; hands on rows written to the store (scores, revisions, runs) and a summary
frame, one row per revision. `options` holds the configuration, `streaming` fetches the next
revisions (and loads the next model) while one is scored, `run` is the scan itself, and `ray`
spreads revisions over a Ray cluster.

May import: `scoring`, `model`, `microsuite`, `calibration`, `fetch` and the edges.
"""

from .options import ScanConfig
from .run import scan

__all__ = ["ScanConfig", "scan"]
