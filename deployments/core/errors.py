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


class Unauthorized(SearchError):
    """A write without a valid `Authorization: Bearer <key>`. HTTP 401 + WWW-Authenticate."""

    code = "unauthorized"


class Forbidden(SearchError):
    """The caller may not do this here (e.g. writes on a read-only service). HTTP 403."""

    code = "forbidden"


class BackendUnavailable(SearchError):
    """Milvus or a replica is down or too slow; retry later. HTTP 503."""

    code = "backend_unavailable"


class IncompatibleStore(SearchError):
    """The collection was made by another schema or model than the service runs with: rebuild
    it (the message names the command). Raised at start-up; HTTP 503 if it reaches a route."""

    code = "incompatible_store"


def validation_message(errors: list[dict], unknown: str = "unknown field") -> str:
    """One readable line from pydantic's `ValidationError.errors()`: `where: what` per problem,
    joined by "; " (`unknown` names a field the model does not have)."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
        if error["type"] == "extra_forbidden":
            parts.append(f"{unknown} {where!r}")
        else:
            parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
