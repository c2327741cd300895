"""The playground: a page at `/ui` with one live panel per deployment (`ui_app`)."""

from sheaf.ui.routes import ui_app

__all__ = ["ui_app"]
