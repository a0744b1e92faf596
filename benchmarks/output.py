"""Writing a benchmark script's results."""

from __future__ import annotations

import json
import os


def write_json(results: dict, path: str | None, announce: bool = True) -> None:
    """``results`` as indented JSON at ``path`` (nothing when ``path`` is ``None``),
    written then renamed, so that a run stopped mid-write keeps the previous file whole."""
    if not path:
        return
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(f"{path}.tmp", path)
    if announce:
        print(f"wrote {path}")
