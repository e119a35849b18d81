"""Image bytes from the request: base64 strings, or URLs fetched with size and time limits and never from
loopback, private, link-local or metadata addresses (unless allowed).

Every hop is checked on the address it resolves to, and the connection goes to exactly that address (the host
name is only sent as `Host` / TLS server name), so a name that resolves differently a second later (DNS
rebinding) or a redirect to an internal address cannot reach inside. Redirects are followed by hand, at most
`max_redirects`, each one checked again.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urljoin, urlsplit


class BadImageInput(ValueError):
    """Input the client must fix; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def address_is_internal(ip: str) -> bool:
    """Loopback, private, link-local (cloud metadata), reserved, multicast or unspecified."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return (addr in METADATA_ADDRESSES or addr.is_loopback or addr.is_private or addr.is_link_local
            or addr.is_reserved or addr.is_multicast or addr.is_unspecified)


_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


@dataclass
class UrlPolicy:
    """What a URL may reach: `allowed(ip)` decides per resolved address."""

    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3
    resolve: Callable[[str, int], list[str]] = field(default=_resolve)

    def allowed(self, ip: str) -> bool:
        return self.allow_private or not address_is_internal(ip)


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to one checked address; the URL's host name only goes into `Host`."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self):
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """As `_PinnedHTTP`, with TLS verified against the URL's host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self):
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, policy: UrlPolicy) -> bytes:
    """The body of `url` (http/https), within the policy's limits; BadImageInput saying what went wrong."""
    deadline = time.monotonic() + policy.timeout_s
    for _hop in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadImageInput(f"not an http(s) URL: {url[:200]!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        future = _RESOLVER.submit(policy.resolve, parts.hostname, port)  # getaddrinfo has no timeout of its own
        try:
            addresses = future.result(timeout=max(deadline - time.monotonic(), 0.001))
        except concurrent.futures.TimeoutError as exc:
            raise BadImageInput(f"resolving {parts.hostname} timed out after {policy.timeout_s:g} s", 408) from exc
        except (OSError, UnicodeError) as exc:
            raise BadImageInput(f"cannot resolve {parts.hostname}: {exc}", 400) from exc
        forbidden = [ip for ip in addresses if not policy.allowed(ip)]
        if forbidden or not addresses:
            raise BadImageInput(f"URL {url[:200]} resolves to a forbidden address {', '.join(forbidden) or '(none)'} "
                                "(loopback, private, link-local or metadata; the server refuses these unless started "
                                "with --allow-private-urls)", 403)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BadImageInput(f"fetching {url[:200]} timed out after {policy.timeout_s:g} s", 408)
        conn = (_PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP)(parts.hostname, port, addresses[0], remaining)
        try:
            path = parts.path or "/"
            conn.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                         headers={"User-Agent": "dinotrain-serve", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise BadImageInput(f"{url[:200]} redirects without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise BadImageInput(f"fetching {url[:200]} failed: HTTP {response.status} {response.reason}", 400)
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise BadImageInput(f"image at {url[:200]} is {int(length)} bytes, more than the limit "
                                    f"{policy.max_bytes}", 413)
            body = response.read(policy.max_bytes + 1)
            if len(body) > policy.max_bytes:
                raise BadImageInput(f"image at {url[:200]} is more than the limit of {policy.max_bytes} bytes", 413)
            return body
        except socket.timeout as exc:
            raise BadImageInput(f"fetching {url[:200]} timed out after {policy.timeout_s:g} s", 408) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise BadImageInput(f"cannot fetch {url[:200]}: {type(exc).__name__}: {exc}", 400) from exc
        finally:
            conn.close()
    raise BadImageInput(f"{url[:200]}: more than {policy.max_redirects} redirects")


def image_bytes(item: str, policy: UrlPolicy) -> bytes:
    """A request's image: a URL (fetched under `policy`) or a base64 string (optionally a data: URL)."""
    text = item.strip()
    if text.startswith(("http://", "https://")):
        return fetch_url(text, policy)
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    if len(text) * 3 // 4 > policy.max_bytes:
        raise BadImageInput(f"base64 image of about {len(text) * 3 // 4} bytes is more than the limit of "
                            f"{policy.max_bytes}", 413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImageInput(f"neither an http(s) URL nor valid base64: {exc}") from exc
