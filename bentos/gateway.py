"""The entry service: every configured deployment behind one host and port.

Each other module of this package defines one deployment's service; those whose config
is in the active config set are served. Adding a backend is adding a module and a config.
"""

import importlib
import pkgutil
from typing import Any

import bentoml

import bentos
from sheaf.gateway import gateway_routes, serve_contract


def _deployments() -> list[bentoml.Service[Any]]:
    modules = (importlib.import_module(f"bentos.{m.name}") for m in pkgutil.iter_modules(bentos.__path__))
    return [
        service
        for module in modules
        if module.__name__ != __name__
        for service in vars(module).values()
        if isinstance(service, bentoml.Service)
    ]


@bentoml.service(name="sheaf")
class Sheaf(gateway_routes(*_deployments())):  # type: ignore[misc]
    """Serves /{name}/predict, /{name}/stream, /{name}/health and /{name}/ready for each deployment."""


serve_contract(Sheaf)
