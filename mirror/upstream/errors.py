"""How an upstream failed, and the answer a client gets for it."""
from __future__ import annotations

import email.utils

from mirror.errors import RegistryError
from mirror.upstream.ratelimit import DEFAULT_RETRY_AFTER


class UpstreamError(Exception):
    """The upstream could not be reached (status None) or answered with an error status."""

    def __init__(self, upstream: str, status: int | None, message: str, retry_after: str | None = None) -> None:
        super().__init__(f"upstream {upstream}: {message}")
        self.upstream = upstream
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def outage(self) -> bool:
        """Down, failing or rate-limiting: cached content may stand in for an answer."""
        return self.status is None or self.status >= 500 or self.status == 429

    @property
    def reason(self) -> str:
        """A short label for metrics: unreachable, 5xx or ratelimited."""
        if self.status is None:
            return "unreachable"
        return "ratelimited" if self.status == 429 else "5xx"

    def to_registry_error(self, unknown_code: str) -> RegistryError:
        """The answer a client gets when we have nothing better to give it.

        A 429 always carries `Retry-After` (upstream's when it gave a usable one), so clients
        back off instead of retrying at once.
        """
        text = f"upstream {self.upstream}: {self.message}"
        if self.status is None:
            return RegistryError("UNAVAILABLE", 503, text)
        if self.status == 404:
            return RegistryError(unknown_code, 404, text)
        if self.status == 401:
            return RegistryError("UNAUTHORIZED", 401, text)
        if self.status == 403:
            return RegistryError("DENIED", 403, text)
        if self.status == 429:
            return RegistryError("TOOMANYREQUESTS", 429, text, headers={"Retry-After": retry_after_value(self.retry_after)})
        if self.status >= 500:
            return RegistryError("UNAVAILABLE", 502, text)
        return RegistryError("UNKNOWN", self.status, text)


def retry_after_value(value: str | None) -> str:
    """A `Retry-After` to relay (RFC 9110 §10.2.3): upstream's seconds or HTTP date, else our default."""
    value = (value or "").strip()
    if value.isdigit():
        return value
    try:
        if value and email.utils.parsedate_to_datetime(value):
            return value
    except (TypeError, ValueError):
        pass
    return str(int(DEFAULT_RETRY_AFTER))
