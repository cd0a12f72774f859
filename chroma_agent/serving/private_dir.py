"""A folder of personal data (call transcripts, recordings): made private (0700) if missing
and checked writable at a server's start, so it fails then, not at its first call."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def prepare_private_dir(directory: str | os.PathLike, option: str, what: str) -> Path:
    """`directory` made (0700) if missing and checked writable now; its resolved path.
    ValueError naming the command-line `option` ("--record") and `what` goes there."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{option} {directory}: cannot write {what} there "
                         f"({e.strerror or type(e).__name__})") from None
    return path.resolve()
