"""Start or join Ray with the project's environment: the one bring-up of ``cmr serve``, ``cmr tune``,
``cmr train --ray``, the serving benchmark, the load test and the Ray tests. Plain ``ray`` only
(the core never imports Ray Serve); deploying the app is ``services.app.deploy``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

from cmr import constants


def start(address: str | None = None, num_cpus: int | None = None, env: Mapping[str, str] | None = None,
          log_to_driver: bool = False) -> bool:
    """Join the cluster at ``address`` (``auto``: ``RAY_ADDRESS`` or the machine's latest
    ``ray start``), or start a new local Ray with ``num_cpus`` (None: what Ray detects) whose
    processes inherit this driver's cache and offline settings plus ``env`` (e.g. Serve's front
    door: Ray reads it when its processes start; a joined cluster keeps its own). Returns whether
    this call started Ray (False when this process is already connected)."""
    import ray

    if ray.is_initialized():
        return False
    constants.export_for_ray_workers(env)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # "local": a new Ray, never one found on the machine (Ray's default for no address joins
        # the latest `ray start` there: another user's processes would run this app, its keys
        # and prompts; with num_cpus it failed with a traceback instead)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    return True


@contextmanager
def running(address: str | None = None, num_cpus: int | None = None, env: Mapping[str, str] | None = None,
            log_to_driver: bool = False) -> Iterator[None]:
    """:func:`start` for the block; Ray is shut down after it only when this call started it."""
    started = start(address, num_cpus, env, log_to_driver)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
