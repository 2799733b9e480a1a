"""URL guard: the only way mmpipe fetches from the web (scheme allowlist, address blocking, caps).

img2dataset fetches with `urllib.request.urlopen`. Inside each download process we install
an opener built here (`install`), so every request and every redirect hop goes through:
  1. scheme allowlist (http/https only; file://, ftp://, data: are never fetched),
  2. DNS resolution with every address checked against blocked networks (private, loopback,
     link-local, CGNAT, ULA, metadata...) unless `allow_networks` names it, and the socket
     then connects to the checked address (no second lookup, so no DNS rebinding),
  3. a body read with a byte cap and a wall-clock deadline,
  4. an image check: the header's pixel count is compared with `max_pixels` before any
     decode, then a cheap reduced-size decode catches truncated data.
Errors are raised as FetchError("reason: detail") with reasons from `reasons.REASONS`.
Proxies from the environment are not used: a proxy would connect on our behalf, unchecked.
"""

from __future__ import annotations

import email.message
import http.client
import io
import ipaddress
import posixpath
import socket
import time
import urllib.error
import urllib.request
import urllib.response
import warnings
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image

from mmcore import storage
from mmcore.data.config import GuardConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (network, what it is). Sources: RFC 6890 special-purpose registries, cloud metadata docs.
BLOCKED_NETWORKS: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = [
    (ipaddress.ip_network(cidr), label) for cidr, label in [
        ("0.0.0.0/8", "this-network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "CGNAT"),  # also Alibaba's metadata 100.100.100.200
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # includes the 169.254.169.254 metadata service
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "NAT64 local"),
        ("100::/64", "discard"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "unique local (ULA)"),  # includes AWS's fd00:ec2::254 metadata
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    ]
]


class FetchError(Exception):
    """A refused or failed fetch; str() is "reason: detail" (reasons.REASONS)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_url(url: str, policy: GuardConfig) -> None:
    """Refuse URLs that are malformed or use a scheme outside the allowlist."""
    if not isinstance(url, str) or not url.strip() or any(c.isspace() or ord(c) < 32 for c in url):
        raise FetchError("malformed_url", f"{url!r} is empty or contains whitespace/control characters")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as err:
        raise FetchError("malformed_url", f"{url!r}: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes:
        shown = scheme or "(none)"
        raise FetchError("scheme_not_allowed", f"scheme {shown!r} of {url[:80]!r} is not in {policy.allowed_schemes}")
    if not parts.hostname:
        raise FetchError("malformed_url", f"{url!r} has no host")


def blocked_label(ip: IPAddress, policy: GuardConfig) -> str | None:
    """Why `ip` may not be reached, or None when it may."""
    if any(ip in ipaddress.ip_network(cidr) for cidr in policy.allow_networks):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return blocked_label(ip.ipv4_mapped, policy)
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:
        return blocked_label(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), policy)
    for network, label in BLOCKED_NETWORKS:
        if ip.version == network.version and ip in network:
            return label
    return None if ip.is_global else "non-global"


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def resolve(host: str, port: int, policy: GuardConfig) -> str:
    """Resolve `host` and return one address to connect to; refuse if any address is blocked."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise FetchError("connection_error", f"cannot resolve {host!r}: {err}") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        label = blocked_label(ipaddress.ip_address(address.split("%")[0]), policy)
        if label:
            raise FetchError("blocked_network", f"{host} resolves to {address} ({label}); "
                             "allow it with guard.allow_networks / --allow-network")
    return addresses[0]


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: GuardConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy

    def connect(self):
        address = resolve(self.host, self.port, self.policy)
        self.sock = socket.create_connection((address, self.port), self.timeout, self.source_address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, policy: GuardConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy

    def connect(self):
        address = resolve(self.host, self.port, self.policy)
        sock = socket.create_connection((address, self.port), self.timeout, self.source_address)
        # Certificate and SNI are checked against the host name, not the pinned address.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _open(handler, connection_class, req, **kwargs):
    """do_open with our errors unwrapped from urllib's URLError."""
    try:
        return handler.do_open(connection_class, req, policy=handler.policy, **kwargs)
    except urllib.error.URLError as err:
        raise _as_fetch_error(err.reason, req.full_url) from None
    except OSError as err:
        raise _as_fetch_error(err, req.full_url) from None


def _as_fetch_error(err, url: str) -> FetchError:
    if isinstance(err, FetchError):
        return err
    if isinstance(err, (TimeoutError, socket.timeout)):
        return FetchError("timeout", f"{url}: timed out")
    return FetchError("connection_error", f"{url}: {err}")


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: GuardConfig):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return _open(self, _GuardedHTTPConnection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: GuardConfig):
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        return _open(self, _GuardedHTTPSConnection, req, context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: GuardConfig):
        super().__init__()
        self.policy = policy
        self.max_redirections = policy.max_redirects

    def http_error_302(self, req, fp, code, msg, headers):
        # Checked before urllib's own handling, which refuses other schemes with a vaguer error;
        # the new host is checked when the hop connects.
        location = headers.get("location") or headers.get("uri")
        if location:
            check_url(urljoin(req.full_url, location), self.policy)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _ErrorHandler(urllib.request.BaseHandler):
    def http_error_default(self, req, fp, code, msg, hdrs):
        if 300 <= code < 400:
            raise FetchError("http_error", f"HTTP {code} {msg} (redirect not followed: limit or missing Location)")
        raise FetchError("http_error", f"HTTP {code} {msg}")


class _UnknownSchemeHandler(urllib.request.BaseHandler):
    def unknown_open(self, req):
        raise FetchError("scheme_not_allowed", f"scheme {req.type!r} of {req.full_url[:80]!r} is not allowed")


class _ImagesHandler(urllib.request.BaseHandler):
    """`images:<path>` (a conversation file's image paths, data/conversations.py): a file under `root` (a
    directory, or `s3://bucket/prefix`), read under the byte cap and checked as a fetched body is; a path that
    leads out of `root` is refused (in a bucket, whose keys have no links, `..` is refused when the file is
    read)."""

    def __init__(self, root: str, policy: GuardConfig):
        self.remote = storage.is_remote(root)
        self.root, self.policy = storage.path(root) if self.remote else Path(root).resolve(), policy

    def images_open(self, req):
        relative = unquote(req.selector)
        path = self.root / relative
        if self.remote:
            inside = not posixpath.normpath(relative).startswith(("..", "/"))
        else:
            path = path.resolve()  # follows links: where the file really is
            inside = path.is_relative_to(self.root)
        if not inside:
            raise FetchError("path_outside_root", f"{relative!r} leads to {path}, outside {self.root}")
        if not path.is_file():
            raise FetchError("image_not_found", f"no file {relative!r} under {self.root}")
        if path.stat().st_size > self.policy.max_bytes:
            raise FetchError("too_large", f"{relative!r} is larger than max_bytes {self.policy.max_bytes}")
        body = path.read_bytes()
        check_image(body, self.policy)
        return urllib.response.addinfourl(io.BytesIO(body), email.message.Message(), req.full_url, 200)


class _BodyGuard(urllib.request.BaseHandler):
    """Reads each success body under the byte cap and deadline, then checks it is a sane image."""

    handler_order = 900  # before HTTPErrorProcessor (1000) turns statuses into errors/redirects

    def __init__(self, policy: GuardConfig):
        self.policy = policy

    def http_response(self, req, response):
        if not 200 <= response.status < 300:
            response.close()  # error and redirect bodies are never read
            body = b""
        else:
            body = read_capped(response, self.policy, req.full_url)
            check_image(body, self.policy, response.headers.get("Content-Type", ""))
        out = urllib.response.addinfourl(io.BytesIO(body), response.headers, response.url, response.status)
        out.msg = response.reason
        return out

    https_response = http_response


def read_capped(response, policy: GuardConfig, url: str) -> bytes:
    """Read a response body, refusing more than max_bytes or longer than deadline_s."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        response.close()
        raise FetchError("too_large", f"Content-Length {declared} > max_bytes {policy.max_bytes}")
    content_type = response.headers.get("Content-Type", "")
    if content_type.lower().startswith("text/"):
        response.close()
        raise FetchError("not_an_image", f"Content-Type is {content_type!r}")
    deadline = time.monotonic() + policy.deadline_s
    chunks, size = [], 0
    try:
        while chunk := response.read1(64 * 1024):
            size += len(chunk)
            if size > policy.max_bytes:
                raise FetchError("too_large", f"body exceeds max_bytes {policy.max_bytes}")
            if time.monotonic() > deadline:
                raise FetchError("timeout", f"body not read within deadline {policy.deadline_s}s")
            chunks.append(chunk)
    except (TimeoutError, socket.timeout):
        raise FetchError("timeout", f"{url}: timed out reading the body") from None
    except http.client.IncompleteRead as err:
        raise FetchError("truncated_image", f"connection closed after {len(err.partial)} bytes") from None
    except ConnectionError as err:  # reset or aborted by the server mid-body
        raise FetchError("connection_error", f"{url}: {err} after {size} bytes of the body") from None
    finally:
        response.close()
    return b"".join(chunks)


_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"RIFF", b"BM")


def check_image(body: bytes, policy: GuardConfig, content_type: str = "") -> None:
    """Refuse bodies that are empty, not images, declare too many pixels, or are truncated."""
    if not body:
        raise FetchError("empty_body", "the response body is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(body))  # reads the header only
        except Image.DecompressionBombError as err:
            raise FetchError("too_many_pixels", str(err)) from None
        except Exception:  # noqa: BLE001 - PIL raises many types for non-images
            if body.startswith(_IMAGE_MAGIC):
                raise FetchError("truncated_image", f"image header cut short ({len(body)} bytes)") from None
            head = body[:16]
            raise FetchError("not_an_image", f"unrecognised data (Content-Type {content_type!r}, starts {head!r})") from None
        with image:
            width, height = image.size
            if width * height > policy.max_pixels:
                raise FetchError("too_many_pixels", f"header declares {width}x{height} > max_pixels {policy.max_pixels}")
            try:
                # JPEG decodes at 1/8 scale in draft mode: cheap, and still reads every byte.
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
            except Exception as err:  # noqa: BLE001
                raise FetchError("truncated_image", f"{image.format} data incomplete or corrupt: {err}") from None


def build_opener(policy: GuardConfig, images_root: str | None = None) -> urllib.request.OpenerDirector:
    """An opener with only guarded handlers (no file/ftp/data handlers, no proxies); with `images_root`, one
    that reads `images:` paths under it."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        *([_ImagesHandler(images_root, policy)] if images_root else []),
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy),
        _GuardedRedirectHandler(policy),
        _BodyGuard(policy),
        urllib.request.HTTPErrorProcessor(),
        _ErrorHandler(),
        _UnknownSchemeHandler(),
    ):
        opener.add_handler(handler)
    return opener


def install(policy: GuardConfig, images_root: str | None = None) -> None:
    """Route this process's `urllib.request.urlopen` (img2dataset's fetcher) through the guard."""
    urllib.request.install_opener(build_opener(policy, images_root))

