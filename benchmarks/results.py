"""The results file every benchmark writes: ``benchmarks/results/<benchmark>-<device>-<date>.json``.

Each file carries ``benchmark``, ``device``, ``torch``, ``triton`` (None where it is not importable),
``commit`` (``git rev-parse HEAD`` of this repository, None where unavailable) and ``config``, then the
benchmark's own figures. Benchmarks run as scripts (``python benchmarks/x.py``), which puts this
directory on ``sys.path``: they import it as ``from results import write_results``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# What a companion file holds: its text or bytes, or a function of the result dict that gives them.
ExtraFile = str | bytes | Callable[[dict], str | bytes]


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository; ``BLTDIST_COMMIT`` where the tree is a copy without
    ``.git`` (a lent GPU machine); None where neither is available."""
    if os.environ.get("BLTDIST_COMMIT"):
        return os.environ["BLTDIST_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def write_results(
    benchmark: str,
    device: str,
    config: dict,
    figures: dict,
    *,
    out: str | Path | None = None,
    results_dir: str | Path | None = None,
    file_device: str | None = None,
    date: str | None = None,
    extra_files: Mapping[str, ExtraFile] | None = None,
) -> Path:
    """Write the results JSON (common fields, then ``figures``) and return its path.

    The path is ``out`` if given, else ``<results_dir>/<benchmark>-<file_device or device>-<date>.json``
    (``results_dir`` defaults to benchmarks/results, ``date`` to today). ``extra_files`` maps a suffix
    (".md", ".png") to the content of a file written next to the JSON with that suffix; a callable gets
    the result dict as written to the JSON.
    """
    import torch  # here, so that a script's --help or worker path does not pay for it twice

    result = {
        "benchmark": benchmark,
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "config": config,
        **figures,
    }
    if out is None:
        date = date or datetime.date.today().isoformat()
        out = Path(results_dir or RESULTS_DIR) / f"{benchmark}-{file_device or device}-{date}.json"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for suffix, content in (extra_files or {}).items():
        if callable(content):
            content = content(result)
        target = path.with_suffix(suffix)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return path
