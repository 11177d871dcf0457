"""The openai backend: OpenAI's hosted Code Interpreter (Responses API `code_interpreter` tool + Containers API),
also any OpenAI-compatible endpoint serving /containers (Azure OpenAI, proxies).

Modules: client (SDK client from Settings), failures (error mapping, secret scrubbing), containers, responses
(requests + streaming), parsing (robust response parsing), files (listing, downloads, uploads), backend.
The openai SDK is imported only inside this package.
"""

from __future__ import annotations

from .backend import OpenAIBackend

__all__ = ["OpenAIBackend"]
