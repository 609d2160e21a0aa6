"""One way to patch a callable at runtime: install, remove, is_applied.

A :class:`Patch` replaces the callable in a :class:`Slot` (a class or instance attribute, or a
mapping item) by a wrapper that keeps the original in its closure (also as ``__wrapped__``), so
other plugins may wrap on top of it, or under it, in any order:

- ``install`` is idempotent: if our wrapper is anywhere in the slot's ``__wrapped__`` chain it is
  (re)activated, never stacked twice;
- ``remove`` puts the original back when our wrapper is on top; when another wrapper sits above
  ours (it holds ours in its closure), ours turns into a pass-through instead, so removing in
  either order never breaks the other plugin nor recurses.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

_MARK = "__ntl_deepspeed_patch__"
_MAX_CHAIN = 64


class Slot:
    """Where a patched callable lives: ``owner.name`` or ``owner[name]`` (``item=True``).
    ``backing``: the instance attribute a property ``name`` stores into (HF models'
    ``loss_function`` -> ``_loss_function``), deleted again on restore if it was absent."""

    def __init__(self, owner: Any, name: str, item: bool = False, backing: Optional[str] = None):
        self.owner, self.name, self.item, self.backing = owner, name, item, backing
        self._was_own = item or (backing or name) in getattr(owner, "__dict__", {})

    def same_as(self, other: "Slot") -> bool:
        return self.owner is other.owner and self.name == other.name

    def get(self):
        return self.owner[self.name] if self.item else getattr(self.owner, self.name)

    def set(self, value) -> None:
        if self.item:
            self.owner[self.name] = value
        else:
            setattr(self.owner, self.name, value)

    def restore(self, original) -> None:
        """Put ``original`` back; an attribute that came from the class is deleted again."""
        if not self._was_own:
            delattr(self.owner, self.backing or self.name)  # the class's (or property's) again
            return
        self.set(original)


class Patch:
    """``make_wrapper(original) -> wrapper``; see the module docstring."""

    def __init__(self, make_wrapper: Callable[[Callable], Callable]):
        self._make_wrapper = make_wrapper
        self._wrapper: Optional[Callable] = None
        self._original: Optional[Callable] = None
        self._slot: Optional[Slot] = None
        self._active = False
        self.settings: Any = None  # whatever the wrapper reads at call time (updatable)

    def install(self, slot: Slot) -> Callable:
        if self._wrapper is not None and self._slot.same_as(slot) and self._in_chain(slot.get()):
            self._active = True
            return self._wrapper
        original = slot.get()
        inner = self._make_wrapper(original)
        patch = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if patch._active and patch._wrapper is wrapper:
                return inner(*args, **kwargs)
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original
        setattr(wrapper, _MARK, True)
        slot.set(wrapper)
        self._wrapper, self._original, self._slot, self._active = wrapper, original, slot, True
        return wrapper

    def remove(self) -> None:
        if self._wrapper is None:
            return
        if self._slot.get() is self._wrapper:
            self._slot.restore(self._original)
            self._wrapper = self._original = self._slot = None
        self._active = False  # still under another wrapper: a pass-through from now on

    @property
    def applied(self) -> bool:
        return self._active and self._wrapper is not None and self._in_chain(self._slot.get())

    def _in_chain(self, fn) -> bool:
        for _ in range(_MAX_CHAIN):
            if fn is None:
                return False
            if fn is self._wrapper:
                return True
            fn = getattr(fn, "__wrapped__", None)
        return False


def require(owner: Any, name: str, target: str, supported: str) -> Any:
    """``getattr(owner, name)``, or an AttributeError naming the symbol the patch expected."""
    if not hasattr(owner, name):
        raise AttributeError(f"the installed package has no {target}; ntl-deepspeed patches it "
                             f"(supported: {supported})")
    return getattr(owner, name)
