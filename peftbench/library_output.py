"""Library noise goes to a log file, not the user's terminal.

What libraries print that a user cannot act on (bitsandbytes' "Failed to load CPU gemm_4bit_forward
from kernels-community" at every import on a CPU, transformers' "Loading weights" bars and advisory
warnings, datasets' per-split bars, Python warnings raised inside libraries) goes to
``~/.cache/peftbench/peftbench.log`` and, while a run is going, to the run's own ``run.log``.
peftbench's own messages (the rich console), training progress and errors stay on the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def send_library_output_to_log(path: Path) -> None:
    """Route the logging of every library (and Python warnings) to ``path`` from now on."""
    root = logging.getLogger()
    if any(getattr(h, "_peftbench", False) for h in root.handlers):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:  # an unwritable cache: drop the noise rather than fail the command
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._peftbench = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Read when these libraries are imported (later, in most commands); the user's own setting wins.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars follow it
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """transformers' and datasets' bars and handlers, for libraries already imported; a library
    imported later is quieted when ``quiet_progress_bars`` runs again (the runner calls it)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()  # its own stderr handler...
        hf_logging.enable_propagation()  # ...replaced by ours, through the root logger
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


@contextmanager
def run_log(path: Path):
    """Also write library output to the run's ``run.log`` while the run goes on."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
