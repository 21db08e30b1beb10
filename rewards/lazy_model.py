"""`LazyModel`: a reward's model, loaded on first use and left out of pickles.

The multi-gigabyte rewards (HPSv3, VLM judges, ImageReward) hold their model in one. A reward built in the
driver and shipped to Ray reward workers (pickled) then carries only its loading recipe, so the driver never
loads weights it does not use, no state dict travels through the object store, and each worker loads the
model once, at its first batch, on its own device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class LazyModel:
    """A model built by `load()` on the first `get()`.

    Args:
        load (`Callable[[], Any]`, *optional*): builds the model; must pickle (a module-level function or a
            `functools.partial` of one) so the holder can travel to another process.
        model (*optional*): an already built model, used as is; it then pickles with the holder.

    Attributes:
        num_loads (`int`): how often `load()` ran in this process (1 after the first use).
    """

    def __init__(self, load: Callable[[], Any] | None = None, model: Any = None):
        if (load is None) == (model is None):
            raise ValueError("pass exactly one of `load` (a loading recipe) and `model` (a built model)")
        self._load, self._model = load, model
        self._lock = threading.Lock()
        self.num_loads = 0

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> Any:
        """The model, loaded now if this is the first use (thread-safe: loaded once)."""
        with self._lock:
            if self._model is None:
                self._model = self._load()
                self.num_loads += 1
            return self._model

    def __getstate__(self) -> dict[str, Any]:
        # A loaded model is dropped when it can be rebuilt from the recipe: the receiver loads its own copy.
        return {"load": self._load, "model": self._model if self._load is None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._load, self._model = state["load"], state["model"]
        self._lock = threading.Lock()
        self.num_loads = 0
