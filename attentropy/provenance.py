"""Provenance: the commit of the code and the versions of the packages that produced a run or an instrument."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the attentropy checkout in use, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def package_versions(names) -> dict[str, str]:
    """Installed versions of the named distributions."""
    return {name: importlib.metadata.version(name) for name in names}
