"""Client errors.

MoetraceClientError
└── MoetraceHTTPError   the service answered with a 4xx or 5xx status
"""

from __future__ import annotations

import httpx


class MoetraceClientError(Exception):
    """Raised when a call to the capture service cannot be completed."""


class MoetraceHTTPError(MoetraceClientError):
    """Raised when the service answers with an error status; carries request and response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.request = response.request
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        super().__init__(
            f"{response.status_code} {response.reason_phrase} for "
            f"{self.request.method} {self.request.url}: {detail}"
        )
        self.detail = detail
