"""Progress bars that leave the user's ``TQDM_*`` environment settings in force.

tqdm reads ``TQDM_DISABLE``, ``TQDM_MININTERVAL``, ... only for arguments that the caller does not pass. So a
bar that is switched on must not pass ``disable=False``, or ``TQDM_DISABLE=1`` cannot silence it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar; ``enabled=False`` hides it, ``enabled=True`` shows it unless the environment hides it.

    In a torch.distributed process group only rank 0 shows bars (the others run the same steps).
    """
    if not enabled or not _main_rank():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def _main_rank() -> bool:
    """Whether this process is rank 0 of its torch.distributed group, or in none (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
