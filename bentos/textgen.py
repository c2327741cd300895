"""Text generation: a transformers causal LM, streamed token by token."""

from sheaf.api import TextGenerationRequest
from sheaf.options import TextGenerationOptions
from sheaf.service import deployment_service

TextGen = deployment_service(
    "textgen",  # configs/textgen.yaml
    request_model=TextGenerationRequest,
    backend="sheaf.backends.textgen:TextGenerationBackend",
    options=TextGenerationOptions,
)
