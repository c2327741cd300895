"""OpenAI-compatible routes on the entry service (`/v1/...`), so that the `openai` SDKs and the tools
built on them work against sheaf: chat and plain completions on text generation deployments,
transcriptions and translations on whisper ones, image generations on diffusion ones.

`routes` is the mounted app; `chat`, `audio` and `images` turn each OpenAI request into sheaf's
and sheaf's answers and stream events into OpenAI's objects; `errors` maps sheaf's errors to
OpenAI's shape once.
"""

PREFIX = "/v1"
JSON_ROUTES = ("/chat/completions", "/completions", "/images/generations")
FORM_ROUTES = ("/audio/transcriptions", "/audio/translations")
"""The POST routes under `PREFIX`, by how their bodies come."""
