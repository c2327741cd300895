"""Make sheaf's log lines visible inside a BentoML server."""

import logging


def show_sheaf_logs(level: int = logging.INFO) -> None:
    """BentoML's server logging config disables loggers made before it and shows only WARNING
    from other libraries; call this once a service instance starts so sheaf's lines appear."""
    for name, existing in logging.root.manager.loggerDict.items():
        if (name == "sheaf" or name.startswith("sheaf.")) and isinstance(existing, logging.Logger):
            existing.disabled = False
    logging.getLogger("sheaf").setLevel(level)
