"""A name → class registry filled by a class decorator; strategies and tasks each keep one."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=type)


class Registry(dict):
    """``{name: class}`` for one kind of thing (``"strategy"``, ``"task"``); :meth:`register` is the
    class decorator that adds a class under its ``name`` attribute."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: T) -> T:
        if not getattr(cls, "name", ""):
            raise TypeError(f"{cls.__name__} has no name")
        if cls.name in self and self[cls.name] is not cls:
            raise TypeError(f"{self.kind} name {cls.name!r} is taken by {self[cls.name].__name__}")
        self[cls.name] = cls
        return cls
