"""A TCP round-robin in front of several replicas, as a Kubernetes Service (kube-proxy) is one: each
new connection goes to the next replica that accepts it, and lives and dies with it. It can also cut
connections mid-answer, as a proxy does that limits how long a response may run."""

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Iterator


class RoundRobin:
    def __init__(self, replicas: list[int], cut_after_bytes: int | None = None, cuts: int = 0) -> None:
        """With `cut_after_bytes`, the first `cuts` connections are cut once that many bytes of
        answer have gone through them, as a proxy with a time or size limit cuts a long stream."""
        self.replicas = replicas  # ports on 127.0.0.1
        self.cut_after_bytes = cut_after_bytes
        self.cuts_left = cuts
        self.connections: Counter[int] = Counter()  # accepted per replica, ever
        self.open: Counter[int] = Counter()  # open now per replica
        self.refused: Counter[int] = Counter()  # connections a replica refused, ever
        self.dropped = 0  # client connections closed because every replica refused
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.port = 0

    @contextlib.contextmanager
    def running(self) -> Iterator["RoundRobin"]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        assert self._started.wait(10), "the round-robin did not start"
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        server.close()
        # Relays still open end here, not when the closed loop's leftovers are collected.
        relays = asyncio.all_tasks(self._loop)
        for relay in relays:
            relay.cancel()
        self._loop.run_until_complete(asyncio.gather(*relays, return_exceptions=True))
        self._loop.close()

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        # A replica that refuses (down, restarting) is skipped, as readiness would: each is tried once,
        # from this connection's own turn (others that arrive meanwhile take theirs).
        first, self._next = self._next, self._next + 1
        for turn in range(len(self.replicas)):
            port = self.replicas[(first + turn) % len(self.replicas)]
            try:
                replica_in, replica_out = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                self.refused[port] += 1
                continue
            break
        else:
            self.dropped += 1
            client_out.close()
            return
        self.connections[port] += 1
        self.open[port] += 1
        try:
            # Either side ending ends both: a dead replica drops its callers, a caller that leaves
            # closes the replica's connection (which is how the replica learns to stop).
            limit = None
            if self.cut_after_bytes is not None and self.cuts_left > 0:
                self.cuts_left -= 1
                limit = self.cut_after_bytes
            pipes = [
                asyncio.ensure_future(_pipe(client_in, replica_out)),
                asyncio.ensure_future(_pipe(replica_in, client_out, limit)),
            ]
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
        finally:
            self.open[port] -= 1
            for writer in (replica_out, client_out):
                writer.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, limit: int | None = None) -> None:
    sent = 0
    with contextlib.suppress(OSError):
        while chunk := await source.read(65536):
            if limit is not None and sent + len(chunk) > limit:
                sink.write(chunk[: limit - sent])  # then the connection is cut mid-answer
                await sink.drain()
                return
            sink.write(chunk)
            sent += len(chunk)
            await sink.drain()
