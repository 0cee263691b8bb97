"""Starting, reaching and importing Ray for the pipelines that scale out on it (conversion, sharded index builds).

Ray is an optional dependency (``pip install bc_fast[ray]``): it is imported only by :func:`import_ray`.
A local Ray that bc_fast starts listens on 127.0.0.1 only: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
once, when it is imported, and with ``0`` every server it starts (GCS, raylet, workers) binds to loopback;
without it they listen on all interfaces. A cluster (``address=``) keeps Ray's own settings.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Iterator

__all__ = ["LOOPBACK_ENV", "RAY_INSTALL_HINT", "import_ray", "start_ray", "check_no_shadowing_source", "quiet_ray_deprecations"]

RAY_INSTALL_HINT = "install it with pip install bc_fast[ray]"
#: Ray's switch for its local-only mode, read when ray is imported: "0" makes a local Ray listen on loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(*, local: bool = True) -> Any:
    """Import ``ray`` and ``ray.data`` lazily; ImportError with the install command if missing.

    ``local=True`` (no cluster address) first sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` unless it is
    set already, so that the local Ray :func:`start_ray` starts listens on 127.0.0.1 only.
    """
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the Ray engine needs ray[data], which is not installed ({e.msg}); "
                          f"{RAY_INSTALL_HINT}") from None
    return ray


def check_no_shadowing_source(cwd: str | None = None) -> None:
    """Refuse to start Ray from a folder holding another ``bc_fast/`` package.

    Local Ray workers start in the driver's working directory and import ``bc_fast`` from
    there first: from a source checkout they would load the sources (without the compiled
    core) instead of the installed package and die while starting.
    """
    cwd = os.path.realpath(cwd or os.getcwd())
    here = os.path.join(cwd, "bc_fast")
    installed = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # bc_fast/, above _util/
    if os.path.isfile(os.path.join(here, "__init__.py")) and os.path.realpath(here) != installed:
        raise RuntimeError(
            f"the working directory {cwd} holds a bc_fast/ source folder, which Ray workers would import "
            f"instead of the installed package ({installed}); run the command from another directory")


def start_ray(ray: Any, address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray; True if this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    check_no_shadowing_source()
    if address:
        _check_reachable(address)
    else:
        _check_loopback_only()
    try:
        local = {} if address else {"include_dashboard": False}  # a cluster keeps its own settings
        ray.init(address=address, log_to_driver=False, logging_level="warning", **local)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RuntimeError(f"cannot start or reach {where}: {e}; check the address (ray status) or omit "
                           "--address for a local Ray") from None
    return True


def _check_loopback_only() -> None:
    """Refuse to start a local Ray that would listen on every interface.

    That happens when ray was imported before :func:`import_ray` could set ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``.
    Setting the variable to 1 yourself is an explicit choice and is respected.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without this module: nothing to check against
        return
    listens_everywhere = getattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    chosen = os.environ.get(LOOPBACK_ENV, "").strip().lower() in ("1", "true")
    if listens_everywhere and not chosen:
        raise RuntimeError(
            f"ray was imported before bc_fast could make a local Ray listen on 127.0.0.1 only: set "
            f"{LOOPBACK_ENV}=0 in the environment before importing ray, start Ray yourself, or pass the "
            "address of a Ray cluster")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a cluster address nobody listens at (ray.init would retry for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 literal, "[::1]:6379": getaddrinfo takes it without the brackets
    if address == "auto" or not host or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at --address {address} ({e}); start one with "
                              "`ray start --head` and pass the address it prints, or omit --address for a "
                              "local Ray") from None


@contextlib.contextmanager
def quiet_ray_deprecations() -> Iterator[None]:
    """Hide Ray's own deprecation warnings about its internals (errors under ``-W error``); ours pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.*deprecated")
        yield
