"""Building the SDK client from Settings: AsyncOpenAI, or AsyncAzureOpenAI when an Azure endpoint is set.

The openai SDK is imported only inside this package, so the local backend never loads it.
"""

from __future__ import annotations

import httpx2
from openai import AsyncAzureOpenAI, AsyncOpenAI

from ... import errors
from ...config import Settings

NO_KEY_HINT = (
    "Set OPENAI_API_KEY in the server's environment (for Azure: AZURE_OPENAI_API_KEY with AZURE_OPENAI_ENDPOINT "
    "and OPENAI_API_VERSION), or run with --backend local, which needs no account."
)


def api_key(settings: Settings) -> str:
    key = settings.openai_api_key.get_secret_value().strip() if settings.openai_api_key else ""
    if not key:
        raise errors.AuthFailed("The openai backend has no API key.", hint=NO_KEY_HINT)
    return key


def model_name(settings: Settings) -> str:
    """What goes in `model`: the Azure deployment when there is one, else the configured model."""
    if settings.azure_endpoint and settings.azure_deployment:
        return settings.azure_deployment
    return settings.openai_model


def build_client(settings: Settings, http_client: httpx2.AsyncClient | None = None) -> AsyncOpenAI:
    """The client all API calls go through; SDK retries = settings.openai_max_retries (Retry-After ≤120 s)."""
    key = api_key(settings)
    timeout = httpx2.Timeout(settings.openai_timeout_s, connect=min(10.0, settings.openai_timeout_s))
    if settings.azure_endpoint:
        if not settings.azure_api_version:
            raise errors.BackendError(
                "Azure OpenAI needs an API version.",
                hint="Set OPENAI_API_VERSION (or CODE_INTERPRETER_AZURE_API_VERSION), e.g. 2025-04-01-preview.",
            )
        return AsyncAzureOpenAI(
            azure_endpoint=settings.azure_endpoint,
            api_version=settings.azure_api_version,
            azure_deployment=settings.azure_deployment,
            api_key=key,
            max_retries=settings.openai_max_retries,
            timeout=timeout,
            http_client=http_client,
        )
    return AsyncOpenAI(
        api_key=key,
        base_url=settings.openai_base_url,
        max_retries=settings.openai_max_retries,
        timeout=timeout,
        http_client=http_client,
    )


def endpoint(settings: Settings) -> str:
    """The API endpoint for doctor/logs (never carries a secret)."""
    if settings.azure_endpoint:
        return f"azure:{settings.azure_endpoint}"
    return settings.openai_base_url or "https://api.openai.com/v1"
