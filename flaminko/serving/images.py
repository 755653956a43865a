"""Where a request's images may come from, and their decoding: safe for a server that clients beyond
loopback reach.

- data URLs (base64) are always accepted;
- local paths and `file://` URLs only under the folder the operator named (`--allow-local-files DIR`),
  resolved first, so neither `..` nor a symlink leads out of it; every path that cannot be served,
  whether outside the folder, missing or unreadable, gets the same message, so a client cannot probe
  which files exist;
- http(s) URLs are fetched unless the operator turned fetching off, never from a loopback, private or
  link-local address unless allowed (checked on the resolved address, which is the one connected to,
  and again at every redirect), within one deadline and a size cap.

Everything here blocks (network, disk, decoding): the server calls it off its event loop.
"""

import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_IMAGE_MB = 20.0
MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


class ImageRefused(ValueError):
    """An image a request names that cannot be served; the message is meant for the client."""


def is_public_address(address: str) -> bool:
    """Whether an IP address is on the public internet: not loopback, private, link-local, shared,
    reserved, multicast or unspecified (an IPv4-mapped IPv6 address counts as its IPv4 one)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PinnedConnection:
    """http.client connections to addresses resolved and checked beforehand, so a second name
    resolution (DNS rebinding) cannot lead elsewhere; TLS still verifies the URL's host name. The
    socket is kept for the deadline's watchdog (http.client drops its own reference early)."""

    class HTTP(http.client.HTTPConnection):
        def __init__(self, host, port, addresses, deadline):
            super().__init__(host, port)
            self.addresses, self.deadline = addresses, deadline

        def connect(self):
            self.sock = self.pinned_socket = _connect(self.addresses, self.port, self.deadline)

    class HTTPS(http.client.HTTPSConnection):
        def __init__(self, host, port, addresses, deadline):
            super().__init__(host, port, context=ssl.create_default_context())
            self.addresses, self.deadline = addresses, deadline

        def connect(self):
            raw = _connect(self.addresses, self.port, self.deadline)
            self.sock = self.pinned_socket = self._context.wrap_socket(raw, server_hostname=self.host)


def _connect(addresses: list[str], port: int, deadline: float):
    """A socket to the first of the addresses (in the resolver's order) that answers in time."""
    for address in addresses[:-1]:
        try:
            return socket.create_connection((address, port), _remaining(deadline))
        except TimeoutError:
            raise
        except OSError:
            continue
    return socket.create_connection((addresses[-1], port), _remaining(deadline))


def _cut(sock) -> None:
    """Ends a connection that ran past the deadline: a read blocked on it returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@dataclass(frozen=True)
class ImageSources:
    """The operator's choices (`flaminko serve` options) and the loading of one `image_url`."""

    local_files: Path | None = None
    fetch_urls: bool = True
    allow_private_urls: bool = False
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB
    # flaminko serve's options (under their Python names) -> the fields they set.
    OPTIONS: ClassVar[dict[str, str]] = {
        "allow_local_files": "local_files",
        "fetch_images": "fetch_urls",
        "allow_private_urls": "allow_private_urls",
        "fetch_timeout": "fetch_timeout_s",
        "max_image_mb": "max_image_mb",
    }

    @classmethod
    def from_options(cls, options: dict) -> "ImageSources":
        """The sources flaminko serve's options name (--allow-local-files, --no-fetch-images...), taken
        out of `options`, which keeps the others."""
        return cls(**{field: options.pop(option) for option, field in cls.OPTIONS.items() if option in options})

    def __post_init__(self):
        if self.local_files is not None:
            folder = Path(self.local_files).expanduser()
            if not folder.is_dir():
                raise ValueError(f"--allow-local-files {self.local_files}: no such folder")
            object.__setattr__(self, "local_files", folder.resolve())
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"--fetch-timeout must be more than 0 seconds, got {self.fetch_timeout_s}")
        if not self.max_image_mb > 0:
            raise ValueError(f"--max-image-mb must be more than 0, got {self.max_image_mb}")

    @property
    def max_bytes(self) -> int:
        return int(self.max_image_mb * 1_000_000)

    def load(self, url: str):
        """The RGB PIL image an `image_url` names; ImageRefused saying why not."""
        scheme = _split(url).scheme.lower()
        if url.startswith("data:"):
            return self._decode(self._data_url(url), "the data URL")
        if scheme in ("http", "https"):
            return self._decode(self._fetch(url), "the image at the URL")
        if scheme in ("", "file"):
            return self._local(unquote(_split(url).path) if scheme == "file" else url)
        raise ImageRefused(f"unsupported image URL scheme `{scheme}:` (give a data URL, an http(s) URL or a local path)")

    def _data_url(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ImageRefused("a data URL image must be base64-encoded (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ImageRefused(f"the data URL's image is larger than the server's {self.max_image_mb:g} MB limit")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ImageRefused(f"the data URL is not valid base64: {error}") from error

    def _local(self, path: str):
        if self.local_files is None:
            raise ImageRefused(
                "this server serves no local image files (it runs without --allow-local-files): "
                "send the image as a data URL or an http(s) URL"
            )
        try:
            return self._decode(self._local_bytes(path), "the file")
        except (OSError, ValueError, RuntimeError):
            # One message whatever went wrong, so that a client learns nothing about which files exist.
            raise ImageRefused("no image at this path in the server's image folder (--allow-local-files)") from None

    def _local_bytes(self, path: str) -> bytes:
        resolved = (self.local_files / path).resolve(strict=True)
        if not resolved.is_relative_to(self.local_files):
            raise PermissionError(path)
        descriptor = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > self.max_bytes:
                raise PermissionError(path)
            return file.read(self.max_bytes + 1)

    def _fetch(self, url: str) -> bytes:
        if not self.fetch_urls:
            raise ImageRefused("this server fetches no image URLs (it runs with --no-fetch-images): send the image as a data URL")
        deadline = time.monotonic() + self.fetch_timeout_s
        try:
            for _ in range(MAX_REDIRECTS + 1):
                data, location = self._hop(url, deadline)
                if location is None:
                    return data
                url = urljoin(url, location)
        except (OSError, http.client.HTTPException) as error:
            if time.monotonic() >= deadline or isinstance(error, TimeoutError):
                raise ImageRefused(f"fetching the image URL took longer than the server's {self.fetch_timeout_s:g} s limit") from None
            raise ImageRefused("cannot fetch the image URL (the connection failed)") from None
        raise ImageRefused(f"the image URL redirects more than {MAX_REDIRECTS} times")

    def _hop(self, url: str, deadline: float) -> tuple[bytes | None, str | None]:
        """One request: the body, or where it redirects to. The address is checked first."""
        parts = _split(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageRefused("an image URL may only redirect to another http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            resolved = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(info[4][0] for info in resolved))
        except (socket.gaierror, UnicodeError):
            raise ImageRefused(f"cannot resolve the image URL's host {parts.hostname}") from None
        if not self.allow_private_urls and not all(is_public_address(address) for address in addresses):
            raise ImageRefused(
                f"refusing to fetch from {parts.hostname}: a loopback, private or link-local address "
                "(the server runs without --allow-private-urls)"
            )
        connection_class = _PinnedConnection.HTTPS if parts.scheme == "https" else _PinnedConnection.HTTP
        connection = connection_class(parts.hostname, port, addresses, deadline)
        connection.connect()
        watchdog = threading.Timer(_remaining(deadline), _cut, (connection.pinned_socket,))
        watchdog.start()
        try:
            path = parts.path or "/"
            connection.request("GET", f"{path}?{parts.query}" if parts.query else path, headers={"Accept": "image/*", "User-Agent": "flaminko-serve"})
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES and response.getheader("Location"):
                return None, response.getheader("Location")
            if response.status != 200:
                raise ImageRefused(f"the image URL answered HTTP {response.status}")
            return self._read(response, deadline), None
        finally:
            watchdog.cancel()
            connection.close()
            connection.pinned_socket.close()

    def _read(self, response, deadline: float) -> bytes:
        too_large = f"the image at the URL is larger than the server's {self.max_image_mb:g} MB limit"
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise ImageRefused(too_large)
        data = bytearray()
        while chunk := response.read1(_CHUNK):
            data += chunk
            if len(data) > self.max_bytes:
                raise ImageRefused(too_large)
        if time.monotonic() >= deadline:  # the watchdog cut the connection
            raise TimeoutError
        return bytes(data)

    @staticmethod
    def _decode(data: bytes, what: str):
        from PIL import Image

        from ..processing_flaminko import decode_image_file, load_image

        try:
            return load_image(decode_image_file(io.BytesIO(data)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageRefused(f"{what} is too large to decode safely: {error}") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageRefused(f"{what} holds no decodable image") from error


def _split(url: str):
    """The URL's parts, checked: urllib checks the port only when it is read."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as error:
        raise ImageRefused(f"not a valid URL: {error}") from None
    return parts


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
