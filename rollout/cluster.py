"""Starting Ray for the rollout engine: a private local instance on 127.0.0.1, or an existing cluster.

A local Ray started here is private to this machine and quiet:

- every Ray server (GCS, raylet, workers, agents) listens on 127.0.0.1 only. Ray normally replaces a
  loopback node address by the machine's routable IP; its single-machine mode (the one it uses on macOS and
  Windows, switched by `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) keeps everything on loopback;
- the dashboard is off unless `include_dashboard=True` (it then listens on 127.0.0.1:8265);
- usage stats are off, and the head does not probe cloud metadata addresses: it looks for
  `~/ray_bootstrap_config.yaml` to learn its cloud provider and probes 169.254.169.254 when the file is
  missing, so the head processes start with `HOME` pointing at a temporary folder holding that file (`{}`).
  Workers get the user's own `HOME` back through the job's runtime environment;
- Ray's token authentication keeps its default (on, unless `RAY_AUTH_MODE=disabled`); the token Ray
  generates then lives in the temporary folder, and `RAY_AUTH_TOKEN_PATH` points every process at it.

With `address=` (or `RAY_ADDRESS` set) the driver connects to an existing cluster instead, whose own
configuration applies. A Ray session that was already initialised by the caller is used as it is.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_BOOTSTRAP_FILE = "ray_bootstrap_config.yaml"


@dataclass
class RaySession:
    """The Ray session the engine runs in.

    Args:
        owned (`bool`): this library called `ray.init` (local start or connection) and shuts it down.
        local (`bool`): a private local instance was started here.
        home (`str`, *optional*): the temporary `HOME` of the local head processes, removed at shutdown.
        saved_env (`dict`): variables of this process to restore at shutdown.
    """

    owned: bool
    local: bool
    home: str | None = None
    saved_env: dict[str, str | None] = field(default_factory=dict)

    def shutdown(self) -> None:
        """Stop (local) or disconnect from (remote) Ray if this library started the session."""
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()
        self.owned = False
        _restore(self.saved_env)
        self.saved_env = {}
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


def init_ray(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = False,
    runtime_env: dict[str, Any] | None = None,
    **init_kwargs: Any,
) -> RaySession:
    """Start or join Ray for the rollout engine.

    Args:
        address (`str`, *optional*): an existing cluster (`"auto"`, `"ray://host:10001"`, `"host:6379"`);
            defaults to `RAY_ADDRESS` when set, else a private local instance is started.
        num_cpus, num_gpus (*optional*): resources of the local instance (Ray detects them by default).
        include_dashboard (`bool`, defaults to `False`): start the dashboard (local instance only).
        runtime_env (`dict`, *optional*): the job's runtime environment (`env_vars`, `py_modules`, ...).
        **init_kwargs: passed to `ray.init`.

    Returns:
        [`RaySession`]; call its `shutdown()` when done.
    """
    import ray

    if ray.is_initialized():
        return RaySession(owned=False, local=False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, runtime_env=runtime_env, **init_kwargs)
        return RaySession(owned=True, local=False)

    home = tempfile.mkdtemp(prefix="rlhf-image-ray-home-")
    with open(os.path.join(home, _BOOTSTRAP_FILE), "w") as f:
        f.write("{}\n")
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    if "HOME" in os.environ:
        env_vars.setdefault("HOME", os.environ["HOME"])
    # The head would write a new token to ~/.ray/auth_token, the temporary HOME, where workers (with the
    # user's HOME) would not look: write it there first and point every process at it (Ray also sets
    # RAY_AUTH_MODE in this process when it turns authentication on; both are restored at shutdown).
    session = RaySession(owned=True, local=True, home=home,
                         saved_env={key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
    if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        token_path = os.path.join(home, ".ray", "auth_token")
        os.makedirs(os.path.dirname(token_path), mode=0o700)
        with open(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32))  # the format of Ray's own generator: 256 random bits
        os.environ["RAY_AUTH_TOKEN_PATH"] = token_path
        env_vars.setdefault("RAY_AUTH_TOKEN_PATH", token_path)
    runtime_env["env_vars"] = env_vars
    try:
        with _head_environment(home):
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                     runtime_env=runtime_env, **init_kwargs)
        node_ip = ray.util.get_node_ip_address()
        if not node_ip.startswith("127."):
            raise RuntimeError(
                f"the local Ray instance bound to {node_ip}, not 127.0.0.1; start Ray yourself "
                "(`ray.init(...)` before creating the engine) or pass `address=` to use a configured cluster")
    except BaseException:
        session.shutdown()
        raise
    return session


class _head_environment:
    """Environment of the processes `ray.init` spawns (they inherit it), restored afterwards."""

    def __init__(self, home: str):
        self.values = {"HOME": home, _LOOPBACK_ENV: "0", "RAY_USAGE_STATS_ENABLED": "0"}

    def __enter__(self) -> None:
        # Ray reads its single-machine switch once, when `ray._private.ray_constants` is imported; the driver
        # resolves its own node address through it, so the value must also be set where `ray` is loaded.
        import ray._private.ray_constants as ray_constants

        self.saved = {key: os.environ.get(key) for key in self.values}
        self.saved_constant = ray_constants.ENABLE_RAY_CLUSTER
        os.environ.update(self.values)
        ray_constants.ENABLE_RAY_CLUSTER = False

    def __exit__(self, *exc: object) -> None:
        import ray._private.ray_constants as ray_constants

        _restore(self.saved)
        ray_constants.ENABLE_RAY_CLUSTER = self.saved_constant


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
