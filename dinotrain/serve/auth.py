"""Optional API-key auth in the managed endpoints' style: `Authorization: Bearer <key>`.

The key comes from an environment variable or a file (a Kubernetes / Docker secret is mounted as one), is checked
once at start-up (a bad file is one line, exit 2, never the key's text), and is never logged. The comparison is
constant-time: both sides are hashed first, so that neither a differing byte nor a differing length shows in how long
an answer takes. Liveness and readiness (`/health`, `/ready`) stay open for probes that carry no credentials;
`/docs` and `/openapi.json` describe only the public request format and stay open too; everything else, `/score` and
`/metrics` included, needs the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


def _check_key(key: str, where: str) -> str:
    """The key's own rules, in messages that never quote it."""
    if not key:
        raise ValueError(f"{where} is empty: put the API key in it (one line, no spaces)")
    if any(c.isspace() for c in key):
        raise ValueError(f"{where} holds whitespace inside the key (several lines or words?): it must hold one key, "
                         "one line, no spaces")
    if not key.isascii() or not key.isprintable():
        raise ValueError(f"{where} holds characters that cannot go in an HTTP header: use printable ASCII")
    return key


def load_api_key(env_name: str | None = None, file_path: str | None = None) -> str | None:
    """The key from `--api-key-env NAME` or `--api-key-file PATH` (surrounding whitespace stripped); None for none."""
    if env_name and file_path:
        raise ValueError("give the API key by --api-key-env or by --api-key-file, not both")
    if env_name:
        if env_name not in os.environ:
            raise ValueError(f"--api-key-env {env_name}: the environment variable {env_name} is not set")
        return _check_key(os.environ[env_name].strip(), f"the environment variable {env_name}")
    if file_path:
        path = Path(file_path)
        if not path.is_file():
            raise ValueError(f"--api-key-file {file_path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--api-key-file {file_path}: not UTF-8 text") from None
        except OSError as exc:
            raise ValueError(f"--api-key-file {file_path}: cannot read it ({exc.strerror})") from None
        return _check_key(text.strip(), f"--api-key-file {file_path}")
    return None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class BearerAuth:
    """ASGI middleware: answers 401 before the request body is read unless the request carries the key."""

    def __init__(self, app, key: str):
        self.app = app
        self._key_digest = _digest(key.encode("ascii"))

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool | None:
        """True with the right key, False with a wrong one, None without one."""
        token = bearer_token(headers)
        if token is None:
            return None
        return hmac.compare_digest(_digest(token), self._key_digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        verdict = self.authorized(scope["headers"])
        if verdict:
            return await self.app(scope, receive, send)
        if verdict is None:
            detail, challenge = "send the API key as the header Authorization: Bearer <key>", b"Bearer"
        else:
            detail, challenge = "wrong API key", b'Bearer error="invalid_token"'
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge)]})
        await send({"type": "http.response.body", "body": body})
