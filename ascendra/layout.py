"""Where this copy's sibling packages live: a checkout's top-level folder, or inside ``ascendra``.

The repository keeps the load generator in ``bench/`` and the worker process in ``workers/``, so
that ``python -m bench.serve`` and ``python -m workers`` work from a checkout. An installed
distribution ships the same folders as ``ascendra.bench`` and ``ascendra.workers``: generic
top-level names such as ``bench`` would collide in a user's site-packages.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def sibling_package(name: str) -> str:
    """``name`` when it imports as this checkout's own top-level folder, else ``ascendra.<name>``.

    Asking for the spec finds the package without importing it (the worker package pulls in
    torch, which the coordinator never loads)."""
    init = _CHECKOUT / name / "__init__.py"
    if init.is_file():
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None and Path(spec.origin).resolve() == init:
            return name
    return f"ascendra.{name}"
