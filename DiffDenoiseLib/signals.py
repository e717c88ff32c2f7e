"""A pure-Python signal: connect callables, emit to all of them.

Custom Qt signals declared from Python are fragile in Slicer's PythonQt, so the
logic objects talk to the panel through this class instead. It has no Qt
dependency, which also lets the logic run in tests and scripts.
"""

from itertools import count
from typing import Callable, Dict


class Signal:
    """Qt-like signal: `connect(slot)` returns an id for `disconnect`; `emit(*args)` calls every slot."""

    def __init__(self, *argument_names: str):
        self.argument_names = argument_names
        self._ids = count()
        self._slots: Dict[int, Callable] = {}

    def connect(self, slot: Callable) -> int:
        if not callable(slot):
            raise TypeError("a slot must be callable")
        connection_id = next(self._ids)
        self._slots[connection_id] = slot
        return connection_id

    def disconnect(self, connection_id: int) -> bool:
        return self._slots.pop(connection_id, None) is not None

    def disconnect_all(self) -> None:
        self._slots.clear()

    def emit(self, *args, **kwargs) -> None:
        # A slot may connect or disconnect others while running: iterate over a copy.
        for slot in list(self._slots.values()):
            slot(*args, **kwargs)

    __call__ = emit
