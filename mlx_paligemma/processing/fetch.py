"""Every download of the package (image URLs in generate, batch, fine-tuning and the server; the mask decoder's
weights) and every local file the server reads: one deadline, one byte cap and one address policy for all.

- Only http and https. A total deadline covers the name lookup, the connection, TLS, the headers and the whole
  body (a URL that drips a byte a second ends at the deadline, not after one timeout per read); a byte cap stops a
  body that never ends without reading it whole.
- By default only public addresses: the host is resolved once, EVERY address it resolves to must be public (not
  loopback, private, link-local, multicast, reserved, unspecified, shared or documentation space, IPv4 written in
  IPv6 included), and the connection goes to an address that was checked (no second lookup that a DNS server could
  answer differently). Each redirect is checked the same way. `allow_private=True`, or the environment variable
  MLX_PALIGEMMA_ALLOW_PRIVATE_URLS=1, lifts the address rule (not the scheme rule) for a trusted network.
- A failure after the policy check says what happened (the name not resolved, the connection refused, no answer
  in time, an HTTP status, too large) when asked with `tell=True`: to the person at the keyboard, on the command
  lines and in the Python API. Otherwise (the server, answering others) it is one message whatever happened, so
  the reply cannot tell a closed port from an open one: a server cannot be used to map its network.

Why the standard library's http.client and not httpx: connecting to the checked address is the crux, and
http.client takes a socket we opened ourselves (to the IP, TLS verified against the URL's host name), in a few
lines; httpx resolves names inside its transport (httpcore's network backends), and has per-operation timeouts
like urllib, so a total deadline needs the same watchdog there. And it adds no dependency.
"""

import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Union
from urllib.parse import urljoin, urlsplit

from ..errors import InputError

FETCH_TIMEOUT = 30.0  # seconds for a whole download, lookup to last byte
MAX_FETCH_BYTES = 64 * 2**20  # an image URL's body
MAX_REDIRECTS = 5
ALLOW_PRIVATE_ENV = "MLX_PALIGEMMA_ALLOW_PRIVATE_URLS"
CHUNK = 1 << 16


class FetchError(InputError):
    """A URL that could not be fetched: one line, with its reason or (tell=False) the same whatever happened."""


def unreachable(url: str, timeout: float, max_bytes: int, reason: Optional[str] = None) -> FetchError:
    """`reason` told, or without one the one neutral message for every failure after the policy check (and for
    fetched bytes that are not an image)."""
    if reason is not None:
        return FetchError(f"could not fetch {shown(url)}: {reason}")
    return FetchError(f"could not fetch {shown(url)}: nothing usable within {timeout:g} s and {max_bytes} bytes "
                      "(refused, unreachable, timed out, an HTTP error, too large or not an image: the reason is not "
                      "told)")


def shown(url: str) -> str:
    """The URL for a message: one line, not too long."""
    text = url if url.isprintable() else repr(url)[1:-1]
    return text if len(text) <= 200 else text[:200] + "..."


def allow_private_default() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "") not in ("", "0")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> List[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 one carries (mapped, 6to4, Teredo, NAT64): each must pass the rule too."""
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        out.extend(ip.teredo)
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (the default policy); False for anything local or special."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index names a local link
    if "%" in address:
        return False
    special = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified or not ip.is_global)
    if ip.version == 6:
        return not special and all(is_public(str(a)) for a in _embedded_ipv4(ip))
    return not special


def lookup_addresses(host: str, port: int, deadline: float) -> List[tuple]:
    """getaddrinfo within the deadline (it has no timeout of its own: it runs in a thread we stop waiting for)."""
    result: list = []

    def lookup():
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError, ValueError) as e:
            result.append(e)

    thread = threading.Thread(target=lookup, daemon=True, name="mlx-paligemma-dns")
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    if not result:
        raise _Unreachable(f"the name {host} was not resolved within the deadline")
    if isinstance(result[0], Exception):
        raise _Unreachable(f"the name {host} was not resolved ({result[0].__class__.__name__}: "
                           f"{' '.join(str(result[0]).split())[:100]})")
    return [(family, addr) for family, _, _, _, addr in result[0]]


class _Unreachable(Exception):
    """Any failure inside a fetch after the policy check, with its reason; fetch_chunks tells it or not."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _target(url: str, allow_private: bool, deadline: float, hint: str):
    """(host, port, https, path, checked addresses) of a URL, or InputError for a refused scheme or address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InputError(f"{shown(url)}: only http and https URLs are fetched")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise InputError(f"{shown(url)} is not a valid URL: bad port") from None
    if not host:
        raise InputError(f"{shown(url)} is not a valid URL: no host")
    port = port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    addresses = lookup_addresses(host, port, deadline)
    if not allow_private:
        refused = [a[0] for _, a in addresses if not is_public(a[0])]
        if refused:
            where = refused[0] if refused[0] == host else f"{host} ({refused[0]})"
            raise InputError(f"{shown(url)}: refused, {where} is not a public address (local and private ones are "
                             f"fetched only when allowed: {hint})")
    return host, port, parts.scheme == "https", path, addresses


def _connect(host: str, port: int, https: bool, addresses: List[tuple], deadline: float) -> socket.socket:
    reason = f"no answer from {host}:{port} in time"
    for family, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(remaining)
            sock.connect(address)
        except socket.timeout:
            sock.close()
            continue
        except OSError as e:
            sock.close()
            reason = f"{host}:{port} refused the connection" if isinstance(e, ConnectionRefusedError) else \
                f"cannot connect to {host}:{port} ({e.strerror or type(e).__name__})"
            continue
        if https:
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except (OSError, ValueError) as e:
                sock.close()
                raise _Unreachable(f"TLS with {host} failed ({' '.join(str(e).split())[:150]})") from None
        return sock
    raise _Unreachable(reason)


def fetch_chunks(url: str, timeout: float = FETCH_TIMEOUT, max_bytes: int = MAX_FETCH_BYTES,
                 allow_private: Optional[bool] = None, user_agent: str = "mlx-paligemma",
                 hint: str = f"{ALLOW_PRIVATE_ENV}=1", tell: bool = False) -> Iterator[bytes]:
    """The body of `url`, chunk by chunk, within `timeout` seconds in all and `max_bytes` bytes, following up to
    MAX_REDIRECTS redirects (each checked). InputError names a refused URL (`hint`: how the caller allows local
    addresses); FetchError is every other failure, with its reason when `tell`, else (a server answering others)
    one message whatever happened."""
    if allow_private is None:
        allow_private = allow_private_default()
    deadline = time.monotonic() + timeout
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            host, port, https, path, addresses = _target(current, allow_private, deadline, hint)
            sock = _connect(host, port, https, addresses, deadline)
            expired = threading.Event()

            def cut(sock=sock):  # the watchdog: a read blocked past the deadline returns at once
                expired.set()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            watchdog = threading.Timer(max(deadline - time.monotonic(), 0), cut)
            watchdog.daemon = True
            watchdog.start()
            connection = http.client.HTTPConnection(host, port)
            connection.sock = sock  # http.client opens no socket of its own when it has one
            try:
                connection.request("GET", path, headers={"User-Agent": user_agent, "Accept": "image/*, */*"})
                response = connection.getresponse()
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    current = urljoin(current, response.getheader("Location"))
                    continue
                if response.status != 200:
                    raise _Unreachable(f"HTTP {response.status} {shown(response.reason or '')[:80]}".strip())
                length = response.getheader("Content-Length")
                too_large = f"more than {max_bytes} bytes"
                if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                    raise _Unreachable(f"{too_large} ({int(length)})")
                size = 0
                while True:
                    chunk = response.read1(CHUNK)
                    if expired.is_set():
                        raise _Unreachable(f"not all of it within {timeout:g} s")
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise _Unreachable(too_large)
                    yield chunk
                return
            except OSError as e:
                if expired.is_set():
                    raise _Unreachable(f"not all of it within {timeout:g} s") from None
                raise _Unreachable(f"the connection failed ({e.strerror or type(e).__name__})") from None
            finally:
                watchdog.cancel()
                connection.close()
        raise _Unreachable(f"more than {MAX_REDIRECTS} redirects")
    except InputError:  # a refused scheme or address, at the first hop or a redirect's
        raise
    except _Unreachable as e:
        raise unreachable(url, timeout, max_bytes, e.reason if tell else None) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:150]}"
        raise unreachable(url, timeout, max_bytes, reason if tell else None) from None


def fetch(url: str, timeout: float = FETCH_TIMEOUT, max_bytes: int = MAX_FETCH_BYTES,
          allow_private: Optional[bool] = None, user_agent: str = "mlx-paligemma",
          hint: str = f"{ALLOW_PRIVATE_ENV}=1", tell: bool = False) -> bytes:
    """The whole body of `url` (see fetch_chunks)."""
    return b"".join(fetch_chunks(url, timeout, max_bytes, allow_private, user_agent, hint, tell))


def read_local(path: Union[str, Path], root: Union[str, Path], max_bytes: int) -> bytes:
    """A regular file inside `root` (symlinks and `..` resolved first), at most `max_bytes` bytes.

    A path outside the root gets the same message whether it exists or not."""
    base = Path(root).resolve()
    full = (base / path).resolve()  # an absolute path replaces the root here, and is then checked against it
    if not full.is_relative_to(base):
        raise InputError(f"image {shown(str(path))} is outside {base}, the folder local files are read from")
    try:
        # O_NONBLOCK: a FIFO must not hang the open; the file type is checked on what was opened.
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise InputError(f"image not found: {shown(str(path))}") from None
    except OSError as e:
        raise InputError(f"cannot read image {shown(str(path))}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"image {shown(str(path))} is not a regular file")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"image {shown(str(path))} is more than {max_bytes} bytes")
    return data
