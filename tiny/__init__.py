"""Tiny random models built offline in seconds, for tests and the demo configs; not part of the sheaf package."""
