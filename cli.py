"""Run ckpt-trace from a source checkout: ``python cli.py scan ...``."""

from ckpt_trace.cli import entry_point

if __name__ == "__main__":
    entry_point()
