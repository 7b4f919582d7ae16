"""The one place where postquant finds the shared models and data.

Set ``POSTQUANT_SHARED`` to the folder that holds ``models/``, ``data/`` and ``golden/``; by default it is
``../shared`` next to the repository (or next to the current directory).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "POSTQUANT_SHARED"


def shared_dir() -> Path:
    """Return the shared folder (it may not exist; callers say what is missing)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    repo_sibling = Path(__file__).resolve().parents[1].parent / "shared"
    if repo_sibling.is_dir():
        return repo_sibling
    return (Path.cwd().parent / "shared").resolve()


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder, e.g. ``shared_path("data", "cifar10", "test.npz")``."""
    return shared_dir().joinpath(*parts)
