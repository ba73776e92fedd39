"""The failures a caller can act on; the ingress maps each to one HTTP status."""

from __future__ import annotations


class SearchError(Exception):
    """Base class: `code` is a stable machine-readable name, the message says what to do."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code

    def __reduce__(self):
        # Keep `code` when Ray pickles the exception from a replica to its caller.
        return (self.__class__, (self.message, self.code))


class InvalidInput(SearchError):
    """The request is wrong: bad image, bad text, bad filter. HTTP 4xx."""

    code = "invalid_input"


class NotFound(SearchError):
    """The product (or its image) does not exist. HTTP 404."""

    code = "not_found"


class BackendUnavailable(SearchError):
    """Milvus or a replica is down or too slow; retry later. HTTP 503."""

    code = "backend_unavailable"
