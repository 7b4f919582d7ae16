"""Progress bars: on by default, off on request, and silenced by the user's TQDM_DISABLE."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SCRIPT = """
from postquant.progress import progress_bar
for _ in progress_bar(range(3), enabled={enabled}, desc="work", mininterval=0):
    pass
"""


def _stderr(enabled: bool, env_disable: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    if env_disable is not None:
        env["TQDM_DISABLE"] = env_disable
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(enabled=enabled)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stderr


@pytest.mark.parametrize(
    ("enabled", "env_disable", "shown"),
    [(True, None, True), (False, None, False), (True, "1", False), (False, "0", False)],
)
def test_bars_follow_the_flag_and_the_environment(
    enabled: bool, env_disable: str | None, shown: bool
) -> None:
    assert ("work" in _stderr(enabled, env_disable)) is shown
