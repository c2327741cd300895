"""BentoML's process manager (a circus arbiter) on Unix sockets only its user can reach.

BentoML 1.4 gives the arbiter a control endpoint and an event publisher on 127.0.0.1 TCP
ports that ask no key: any process on the host (or in the pod's network) could list the
services, stop workers, or `add` a watcher that runs a command as the server's user. BentoML
has no setting for these, so the function that `serve_http` calls to make the arbiter is
replaced, before it runs, by one that puts both endpoints in a private folder (0700),
removed when the arbiter exits.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any


def private_control_sockets() -> None:
    """Have every arbiter this process starts listen on private Unix sockets, not TCP ports."""
    from bentoml._internal.utils import circus

    if getattr(circus.create_standalone_arbiter, "sheaf_private", False):
        return

    def create_standalone_arbiter(watchers: list[Any], *, threaded: bool = False, **kwargs: Any) -> Any:
        folder = tempfile.mkdtemp(prefix="sheaf-arbiter-")  # mkdtemp makes it 0700
        arbiter_class = circus.ThreadedArbiter if threaded else circus.Arbiter
        arbiter = arbiter_class(
            watchers,
            endpoint=f"ipc://{folder}/control",
            pubsub_endpoint=f"ipc://{folder}/events",
            check_delay=kwargs.pop("check_delay", 10),  # BentoML's own value, for the same reason
            **kwargs,
        )
        arbiter.exit_stack.callback(shutil.rmtree, folder, ignore_errors=True)
        return arbiter

    create_standalone_arbiter.sheaf_private = True  # type: ignore[attr-defined]
    circus.create_standalone_arbiter = create_standalone_arbiter
