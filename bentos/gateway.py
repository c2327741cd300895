"""The entry service: every configured deployment behind one host and port.

Each other module of this package defines one deployment's service; those whose config
is in the active config set are served. Adding a backend is adding a module and a config.
"""

import importlib
import pkgutil
from typing import Any

import bentoml

import bentos
from sheaf.arbiter import private_control_sockets
from sheaf.config import SERVER_CONFIG_FILE, ConfigError, config_dir
from sheaf.gateway import gateway_routes, serve_contract
from sheaf.metrics import own_multiprocess_dir
from sheaf.service import TIMEOUT_MARGIN_S

# Before `bentoml serve` starts its servers: a metrics folder of this server's own (BentoML's
# default is shared by every server on the machine), and no unauthenticated control port.
own_multiprocess_dir()
private_control_sockets()


def _deployments() -> list[bentoml.Service[Any]]:
    """The configured deployments; a config error stops start-up with its one-line message."""
    try:
        folder = config_dir()
        modules = [importlib.import_module(f"bentos.{m.name}") for m in pkgutil.iter_modules(bentos.__path__)]
    except ConfigError as exc:
        raise SystemExit(f"sheaf: config error: {exc}") from None
    services = [
        service
        for module in modules
        if module.__name__ != __name__
        for service in vars(module).values()
        if isinstance(service, bentoml.Service)
    ]
    served = {service.inner.config_path.name for service in services} | {SERVER_CONFIG_FILE}
    unused = sorted(path.name for path in folder.glob("*.yaml") if path.name not in served)
    if unused:  # most likely a typo in the file name: say so rather than serve without it
        raise SystemExit(f"sheaf: config error: {folder}: no service module reads {', '.join(unused)}")
    if not services:
        raise SystemExit(f"sheaf: config error: {folder}: no deployment configs (*.yaml) there")
    return services


DEPLOYMENTS = _deployments()


# BentoML's timeout only bounds the time to a stream's first byte; sheaf's own deadlines come first.
@bentoml.service(
    name="sheaf",
    traffic={"timeout": max(d.inner.deployment_config.timeout_s for d in DEPLOYMENTS) + TIMEOUT_MARGIN_S},
)
class Sheaf(gateway_routes(*DEPLOYMENTS)):  # type: ignore[misc]
    """Serves /{name}/predict, /{name}/stream, /{name}/batch, /{name}/health and /{name}/ready for each deployment."""


serve_contract(Sheaf)
