"""Test helper: run ``stagewise <args>`` with one function slowed down, so that a test can signal the command
while it is at that point (the tiny runs of the tests are otherwise over before a signal could arrive).

    python tests/slow_command.py <marker file> <module>:<attribute path> <seconds> <stagewise args...>

The function sleeps ``seconds`` before each call; its first call creates the marker file (the command has
got there). Everything else is the real command line, ``lightning_modules.cli.main``.
"""

import functools
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def slow_down(target: str, seconds: float, marker: Path) -> None:
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    function = getattr(owner, name)

    @functools.wraps(function)
    def slowed(*args, **kwargs):
        marker.touch()
        time.sleep(seconds)
        return function(*args, **kwargs)

    setattr(owner, name, slowed)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    marker, target, seconds, *args = sys.argv[1:]
    slow_down(target, float(seconds), Path(marker))
    from lightning_modules.cli import main

    main(args)
