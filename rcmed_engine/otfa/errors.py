"""What the registry and the adaptation raise (a module of its own: shots, registry and engine all use it)."""

from __future__ import annotations


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says what to change."""


class ClassNotFound(RegistryError, KeyError):
    """No class of that name is registered (a KeyError too, so that lookups can catch it as one)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such class"
