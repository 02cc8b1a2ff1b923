"""The event loop a gateway process runs on.

grpc.aio runs on any asyncio event loop. uvloop (libuv; installed with ``ray[serve]``,
and the loop Ray runs its own actors on) costs less per wake-up, callback and future than
the standard library's loop, and the gateway makes several of each per call: on the 2-core
benchmark machine the gateway's own path took ~9 % less CPU per call on it
(``cluster.bench.event_loop``; README "Serving performance"). ``auto`` picks uvloop where
it is installed, else asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from services.core.errors import InvalidArgument

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def resolve(choice: str, flag: str = "--event-loop") -> str:
    """``auto``, ``uvloop`` or ``asyncio`` -> the loop to use (``uvloop`` or ``asyncio``).

    Raises:
        InvalidArgument: an unknown choice, or ``uvloop`` where it is not installed.
    """
    if choice not in CHOICES:
        raise InvalidArgument(flag, f"is {choice!r}; one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    if _uvloop() is None:
        if choice == "uvloop":
            raise InvalidArgument(flag, "uvloop is not installed here (pip install uvloop), "
                                        "or use --event-loop asyncio")
        return "asyncio"
    return "uvloop"


def new(loop: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``resolve`` returned."""
    if loop == "uvloop":
        made: asyncio.AbstractEventLoop = _uvloop().new_event_loop()
        return made
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """``asyncio.run(main)`` on a new loop of the kind ``resolve`` returned."""
    with asyncio.Runner(loop_factory=lambda: new(loop)) as runner:
        return runner.run(main)
