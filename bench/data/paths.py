"""Where tdbench caches data: ``$TDBENCH_CACHE`` (default ``~/.cache/tdbench``)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("TDBENCH_CACHE", Path.home() / ".cache" / "tdbench"))
