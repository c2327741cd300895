"""Reading a backend's stream as its client sees it: the events, without the `ADMITTED` signal."""

from collections.abc import Iterator

from sheaf.api import StreamEvent
from sheaf.backends.base import Admitted


def events(stream: Iterator[StreamEvent | Admitted]) -> Iterator[StreamEvent]:
    """The stream's events; `ADMITTED`, where the backend sends it, must come once, before them."""
    admitted = seen = False
    for item in stream:
        if isinstance(item, Admitted):
            assert not admitted and not seen, "ADMITTED comes once, before any event"
            admitted = True
            continue
        seen = True
        yield item
