"""The entry service: every configured deployment behind one host and port."""

import bentoml

from bentos import textgen
from sheaf.gateway import gateway_routes, serve_contract


@bentoml.service(name="sheaf")
class Sheaf(gateway_routes(textgen.TextGen)):  # type: ignore[misc]
    """Serves /{name}/predict, /{name}/stream, /{name}/health and /{name}/ready for each deployment."""


serve_contract(Sheaf)
