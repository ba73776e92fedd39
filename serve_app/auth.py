"""Who may change the catalogue: a bearer API key on every write route; search stays public.

Keys come from `auth.api_keys` in the config and from SHOPSEARCH_API_KEYS (comma-separated; both
read by deployments.core.settings). With neither, the ingress does not accept anonymous writes:
on first start it creates a random admin key in `auth.key_file` (default ./data/admin_key, mode
0600) and reuses that file on every later start or replica restart; the log says where the file
is, never the key. `auth.read_only: true` makes every write route answer 403.

A presented key is hashed and compared with every configured key's hash in constant time
(`hmac.compare_digest`, no early exit). Logs carry a key id (8 hex digits of the key's sha256),
never a key. Internal writers (demo seeding, the bulk index job) write through deployment handles
or Milvus directly and need no key; a client writing over HTTP reads its key with `client_key`.

Ray Serve runs each ingress replica in its own process, and the FastAPI app it serves is a frozen
copy of the one in serve_app.ingress, so the replica registers its `Authenticator` here
(`configure`) and the route dependency `require_writer` reads it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deployments.core.errors import Forbidden, Unauthorized
from deployments.core.settings import API_KEYS_ENV, AuthSettings, api_keys_from_env

__all__ = ["API_KEYS_ENV", "Authenticator", "api_keys_from_env", "client_key", "configure",
           "key_id", "load_or_create_key", "require_writer", "write_headers"]

log = logging.getLogger("ray.serve")
DEFAULT_KEY_FILE = AuthSettings().key_file


def key_id(key: str) -> str:
    """A short, safe-to-log name for a key: the first 8 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _read_key(path: Path) -> str:
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"the key file {path} is empty: delete it to have a new key created")
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("the admin key file %s is readable by other users; chmod 600 it", path)
    return key


def load_or_create_key(path: str | Path) -> tuple[str, bool]:
    """The admin key in `path`, created (random, mode 0600) when the file does not exist.

    Returns (key, created). Creation is atomic: the key is written to a fresh private file
    (O_CREAT | O_EXCL, 0o600) that is then hard-linked to `path`, which fails if another replica
    got there first (its key is then used), so no reader ever sees a half-written file.
    """
    path = Path(path)
    try:
        return _read_key(path), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path), False
    finally:
        tmp.unlink(missing_ok=True)
    return key, True


class Authenticator:
    """Checks `Authorization: Bearer <key>` against the configured keys (or the key file)."""

    def __init__(self, settings: AuthSettings) -> None:
        self.read_only = settings.read_only
        self.key_file: Path | None = None
        keys = [k.get_secret_value() for k in settings.api_keys]
        if self.read_only:
            log.info("read-only service: write routes answer 403")
        elif keys:
            log.info("writes need one of %d API key(s): ids %s", len(keys),
                     ", ".join(key_id(k) for k in keys))
        else:
            path = Path(settings.key_file)
            key, created = load_or_create_key(path)
            self.key_file = path.resolve()
            keys = [key]
            log.warning("no API key configured (auth.api_keys or %s): writes need the admin key "
                        "%s in %s (key id %s)", API_KEYS_ENV,
                        "created" if created else "kept", self.key_file, key_id(key))
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def check(self, authorization: str | None) -> str:
        """The key id of a valid bearer credential; raises Forbidden (read-only service) or
        Unauthorized (no credential, another scheme, or a key that is not configured)."""
        if self.read_only:
            raise Forbidden("this service is read-only: it does not change the catalogue",
                            code="read_only")
        scheme, _, presented = (authorization or "").strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("this route changes the catalogue: send the header "
                               "'Authorization: Bearer <key>'", code="missing_credentials")
        digest = hashlib.sha256(presented.encode()).digest()
        # Compare with every key, without stopping at a match: the time taken says nothing
        # about which key (or how much of one) matched.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise Unauthorized("the API key is not valid", code="invalid_key")
        return key_id(presented)


_authenticator: Authenticator | None = None
_bearer = HTTPBearer(auto_error=False, description="An API key: SHOPSEARCH_API_KEYS, "
                     "auth.api_keys, or the generated data/admin_key file")


def configure(settings: AuthSettings) -> Authenticator:
    """Create this replica's authenticator (called from the ingress replica's constructor)."""
    global _authenticator
    _authenticator = Authenticator(settings)
    return _authenticator


async def require_writer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """FastAPI dependency of every route that changes state: the caller's key id, or 401/403."""
    del credentials  # declared for the OpenAPI security scheme (/docs); checked below
    if _authenticator is None:  # fail closed
        raise Forbidden("writes are not enabled on this replica", code="writes_disabled")
    kid = _authenticator.check(request.headers.get("authorization"))
    request.scope.setdefault("log_extra", {})["key_id"] = kid  # on the request's log line
    return kid


# -- clients that write over HTTP (benchmarks, scripts) ----------------------------------------
def client_key(key_file: str | Path = DEFAULT_KEY_FILE) -> str | None:
    """The key a client writing over HTTP sends: the first of SHOPSEARCH_API_KEYS, else the
    admin key file a local service created; None when there is neither."""
    keys = api_keys_from_env()
    if keys:
        return keys[0]
    try:
        return Path(key_file).read_text().strip() or None
    except OSError:
        return None


def write_headers(key_file: str | Path = DEFAULT_KEY_FILE) -> dict[str, str]:
    """`{"Authorization": "Bearer <key>"}` for `client_key`, or {} when there is no key."""
    key = client_key(key_file)
    return {"Authorization": f"Bearer {key}"} if key else {}
