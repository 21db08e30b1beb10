"""The reward contract (trl's): call a reward, sync or async, and check what it returns.

A reward is any callable

    fn(prompts: list[str], images: list[PIL.Image.Image], **columns) -> list[float | None]

where `columns` are the extra dataset columns (for example `target_text`), each a list aligned with
`prompts`, and `None` means "cannot score this sample". `async def` rewards (or objects whose
`__call__` is `async def`) are supported. A reward must accept and ignore columns it does not use.
Shipped rewards are classes with a `name` attribute; a plain function is named by its `__name__`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import warnings
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

RewardFunc = Callable[..., "list[float | None] | Awaitable[list[float | None]]"]


class RewardError(RuntimeError):
    """A reward raised: the message names the reward; the reward's own exception is chained (`__cause__`)."""


def _raised(fn: Any, n: int, error: Exception) -> RewardError:
    return RewardError(f"reward {reward_name(fn)!r} raised {type(error).__name__} on a batch of {n} samples: {error}")


def reward_name(fn: Any) -> str:
    """The name a reward is logged under: its `name` attribute, else its `__name__`, else its class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name
    return type(fn).__name__


def is_async_reward(fn: Any) -> bool:
    """Whether calling `fn` returns a coroutine (an `async def` function or `async def __call__`)."""
    if isinstance(fn, functools.partial):
        return is_async_reward(fn.func)
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)
    return call is not None and inspect.iscoroutinefunction(call)


def check_inputs(prompts: Sequence[str], images: Sequence[Any], columns: dict[str, Any]) -> int:
    """Check that prompts, images and list-valued columns are aligned; return the batch size N."""
    n = len(prompts)
    if len(images) != n:
        raise ValueError(f"got {n} prompts but {len(images)} images")
    for key, value in columns.items():
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"column {key!r} has {len(value)} values for {n} prompts")
    return n


def validate_output(name: str, values: Any, n: int) -> list[float | None]:
    """Check a reward's output and convert it to `list[float | None]`.

    Args:
        name (`str`): the reward's name, used in every error message.
        values: what the reward returned; a list, tuple or 1-D numpy array of length `n`.
        n (`int`): the batch size.

    Raises:
        `TypeError`: not a sequence, or an entry that is neither a real number nor `None`.
        `ValueError`: wrong length, or an inf entry (the message names the reward and the index).

    A NaN entry means the reward could not score that sample: it becomes `None` (unscored, never summed; a
    trainer gives it advantage 0 and counts it) and is reported with a `RuntimeWarning` naming the reward and
    the index.
    """
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # numpy arrays (and tensors) become plain lists
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"reward {name!r} returned {type(values).__name__}, expected a list of length {n}")
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} samples")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise TypeError(f"reward {name!r} returned {type(v).__name__} at index {i}, expected float or None")
        f = float(v)
        if math.isnan(f):
            warnings.warn(f"reward {name!r} returned nan at index {i}; treating the sample as unscored (None)",
                          RuntimeWarning, stacklevel=3)
            out.append(None)
            continue
        if math.isinf(f):
            raise ValueError(f"reward {name!r} returned {f} at index {i}; return None for an unscored sample")
        out.append(f)
    return out


def run_coroutine(coro: Awaitable[Any]) -> Any:
    """Run a coroutine to completion from sync code, even if this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # A loop is running here (a notebook, an async trainer): asyncio.run would fail, so use a thread.
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="reward-coroutine")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


async def acall_reward(fn: RewardFunc, prompts: Sequence[str], images: Sequence[Any],
                       **columns: Any) -> list[float | None]:
    """Async twin of `call_reward`: awaits async rewards, calls sync ones directly."""
    n = check_inputs(prompts, images, columns)
    try:
        values = fn(list(prompts), list(images), **columns)
        if inspect.isawaitable(values):
            values = await values
    except Exception as error:
        raise _raised(fn, n, error) from error
    return validate_output(reward_name(fn), values, n)


def call_reward(fn: RewardFunc, prompts: Sequence[str], images: Sequence[Any],
                **columns: Any) -> list[float | None]:
    """Call one reward under the contract and validate its output.

    Args:
        fn: a sync or async reward.
        prompts (`list[str]` of length N).
        images (`list[PIL.Image.Image]` of length N).
        **columns: extra dataset columns, each a list of length N.

    Returns:
        `list[float | None]` of length N (ints and numpy scalars converted to `float`).

    Raises:
        `ValueError` / `TypeError`: misaligned inputs, or an invalid output (wrong length, wrong type,
        NaN or inf), with the reward's name and the sample index in the message.
        [`RewardError`]: the reward raised; the message names it, and its exception is chained.
    """
    n = check_inputs(prompts, images, columns)
    try:
        values = fn(list(prompts), list(images), **columns)
        if inspect.isawaitable(values):
            values = run_coroutine(values)
    except Exception as error:
        raise _raised(fn, n, error) from error
    return validate_output(reward_name(fn), values, n)
