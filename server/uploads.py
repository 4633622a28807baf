"""Files uploaded through fal's storage protocol, kept on this server (docs/fal.md, "Uploads").

    data/uploads/.key                   signs the upload tokens the Python client asks for
    data/uploads/<token>/<name>         an uploaded image; its URL is {base}/uploads/<token>/<name>
    data/uploads/<token>/.pending       a reserved slot still waiting for its bytes (hash of its secret)
    data/uploads/<token>/.part-<n>      a part of a multipart upload

Like outputs (storage.py), upload URLs are capability URLs: the token is unguessable and the URL
is the only way to reach the file. Writing needs a second secret (the slot's, in the upload URL fal
hands out) or, for the Python client's direct upload, a token signed by `issue_token`. Only images
intake accepts are stored (same size and pixel limits), so what the server hands back is always a
usable `image_url`. Admission reads its own uploads from disk (`own_image`) instead of fetching
them: the SSRF guard stays closed to loopback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import TooLarge
from .intake import ImageInputError, check_image, describe

UPLOADS_PATH = "/uploads"
# fal's storage hosts: a client pointed at this server through DNS or a hosts entry uses these names
FAL_STORAGE_HOSTS = frozenset({"rest.fal.ai", "v3.fal.media"})
PENDING = ".pending"
PART = ".part-"
PENDING_TTL = 3600.0  # a reserved slot nobody fills is dropped after an hour
MAX_PARTS = 10_000
CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")  # secrets.token_urlsafe(24)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_URL_PATH = re.compile(rf"^{UPLOADS_PATH}/([A-Za-z0-9_-]{{32}})/([^/]+)$")


class SlotNotFound(LookupError):
    """No reserved slot with that token and secret (never made, already filled, or expired)."""


@dataclass(frozen=True)
class Slot:
    token: str
    name: str
    secret: str

    @property
    def path(self) -> str:
        """The file's path on this server: {base}{path} is its URL."""
        return f"{UPLOADS_PATH}/{self.token}/{self.name}"


def safe_name(file_name: object) -> str:
    """A client's file name reduced to what a URL path segment and a file system both take."""
    name = os.path.basename(str(file_name or "")).strip()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")[:100]
    return name or "upload"


class Uploads:
    def __init__(self, root: Path, max_bytes: int, max_pixels: int, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.max_bytes = max_bytes  # K5SERVE_IMAGE_MAX_BYTES: the whole file, all parts together
        self.max_pixels = max_pixels
        self.clock = clock
        root.mkdir(parents=True, exist_ok=True)
        self._key = _load_key(root / ".key")

    # -- slots: reserve, then fill ----------------------------------------------------------------

    def reserve(self, file_name: object = None) -> Slot:
        """A new slot for one file (fal's initiate): its URL is known now, its bytes come later."""
        slot = Slot(secrets.token_urlsafe(24), safe_name(file_name), secrets.token_urlsafe(24))
        folder = self.root / slot.token
        folder.mkdir()
        pending = {"name": slot.name, "secret": _digest(slot.secret)}
        (folder / PENDING).write_text(json.dumps(pending))
        return slot

    def slot(self, token: str, secret: str) -> Slot:
        """The reserved slot `token` if `secret` is its secret; else SlotNotFound."""
        if not _TOKEN.match(token or ""):
            raise SlotNotFound(token)
        try:
            pending = json.loads((self.root / token / PENDING).read_text())
        except (OSError, ValueError) as exc:
            raise SlotNotFound(token) from exc
        if not hmac.compare_digest(pending.get("secret", ""), _digest(secret or "")):
            raise SlotNotFound(token)
        return Slot(token, pending["name"], secret)

    def fill(self, slot: Slot, data: bytes) -> Path:
        """Check `data` is an image within the limits and store it as the slot's file (blocking)."""
        self.check_size(len(data))
        check_image(data, f"the uploaded file {slot.name!r}", self.max_pixels)
        folder = self.root / slot.token
        path = folder / slot.name
        tmp = folder / f"{PART}{slot.name}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        for leftover in [folder / PENDING, *folder.glob(f"{PART}*")]:
            leftover.unlink(missing_ok=True)
        return path

    def store(self, data: bytes, file_name: object = None) -> Slot:
        """Reserve and fill at once (the Python client's direct upload); nothing stays if refused."""
        slot = self.reserve(file_name)
        try:
            self.fill(slot, data)
        except BaseException:
            shutil.rmtree(self.root / slot.token, ignore_errors=True)
            raise
        return slot

    def check_size(self, size: int) -> None:
        if size > self.max_bytes:
            limit = f"the limit is {self.max_bytes} (K5SERVE_IMAGE_MAX_BYTES)"
            raise TooLarge(f"the uploaded file is {size} bytes; {limit}")

    # -- multipart: parts in any order, then complete ---------------------------------------------

    def put_part(self, slot: Slot, number: int, data: bytes) -> str:
        """Store part `number` of a slot; returns its etag. All parts together obey the size limit."""
        if not 1 <= number <= MAX_PARTS:
            raise ImageInputError(f"part number {number} is not between 1 and {MAX_PARTS}")
        folder = self.root / slot.token
        others = sum(p.stat().st_size for p in folder.glob(f"{PART}*") if p.name != f"{PART}{number}")
        self.check_size(others + len(data))
        (folder / f"{PART}{number}").write_bytes(data)
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def complete_parts(self, slot: Slot, parts: list[tuple[int, str]]) -> Path:
        """Join the listed (part number, etag) parts in order into the slot's file."""
        if not parts:
            raise ImageInputError("a multipart upload needs at least one part")
        folder = self.root / slot.token
        chunks = []
        for number, etag in sorted(parts):
            try:
                chunk = (folder / f"{PART}{int(number)}").read_bytes()
            except (OSError, ValueError) as exc:
                raise ImageInputError(f"part {number} was never uploaded") from exc
            if etag.strip('"') != hashlib.md5(chunk, usedforsecurity=False).hexdigest():
                raise ImageInputError(f"part {number}: etag {etag!r} does not match the part stored")
            chunks.append(chunk)
        return self.fill(slot, b"".join(chunks))

    # -- reading ----------------------------------------------------------------------------------

    def find(self, token: str, name: str) -> Path | None:
        """The stored file, or None: only a well-formed token and name, never a pending slot's parts."""
        if not _TOKEN.match(token) or not _NAME.match(name):
            return None
        path = self.root / token / name
        return path if path.is_file() and not (path.parent / PENDING).exists() else None

    def by_id(self, file_id: str) -> Path | None:
        """The upload a file id names (OpenAI's `input_reference: {file_id}`): its token, the path
        segment after /uploads/ in its URL, alone or as token/name. None: this server holds none."""
        token, _, name = file_id.partition("/")
        if not _TOKEN.match(token):
            return None
        if name:
            return self.find(token, name)
        folder = self.root / token
        if not folder.is_dir() or (folder / PENDING).exists():
            return None
        files = [path for path in folder.iterdir() if _NAME.match(path.name) and path.is_file()]
        return files[0] if len(files) == 1 else None

    def own_image(self, url: str, base_url: str | None, field: str = "image_url") -> bytes | None:
        """The bytes of an upload of this server named by `url`, or None when `url` is not one
        (then it is fetched like any URL). An upload URL of this server's own host (or of fal's
        storage hosts) that holds nothing any more is refused here instead of fetched."""
        if not url[:8].lower().startswith(("http://", "https://")):  # data: URIs: no need to parse megabytes
            return None
        parts = urlsplit(url)
        match = _URL_PATH.match(parts.path)
        if match is None:
            return None
        path = self.find(*match.groups())
        if path is not None:
            return path.read_bytes()
        own = {*FAL_STORAGE_HOSTS, (urlsplit(base_url or "").hostname or "").lower()}
        if (parts.hostname or "").lower() in own:
            raise ImageInputError(
                f"{field} {describe(url)!r} is an upload this server does not hold "
                "(expired with K5SERVE_RETENTION_HOURS, or never completed); upload it again"
            )
        return None

    # -- tokens for the Python client's CDN upload ------------------------------------------------

    def issue_token(self, ttl: float = 3600.0) -> tuple[str, float]:
        """(token, expiry as a unix time): a signed expiry, valid across restarts (the key is on disk)."""
        expires = int(self.clock() + ttl)
        return f"{expires}.{self._sign(str(expires))}", float(expires)

    def token_valid(self, token: str | None) -> bool:
        expires, _, signature = (token or "").partition(".")
        if not expires.isdigit() or int(expires) < self.clock():
            return False
        return hmac.compare_digest(signature, self._sign(expires))

    def _sign(self, message: str) -> str:
        mac = hmac.new(self._key, message.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    # -- retention --------------------------------------------------------------------------------

    def expire(self, older_than: float) -> int:
        """Remove uploads last written before `older_than`, and slots reserved but never filled
        within PENDING_TTL (or `older_than`, if sooner). Returns how many folders went."""
        pending_before = max(older_than, self.clock() - PENDING_TTL)
        removed = 0
        for folder in self.root.iterdir():
            if not folder.is_dir() or not _TOKEN.match(folder.name):
                continue
            try:
                written = folder.stat().st_mtime
            except OSError:
                continue
            cutoff = pending_before if (folder / PENDING).exists() else older_than
            if written < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed


def content_type(path: Path) -> str:
    """The stored image's media type, read from its first bytes (only checked images are stored)."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head.startswith(b"\x89PNG"):
        return CONTENT_TYPES["PNG"]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return CONTENT_TYPES["WEBP"]
    return CONTENT_TYPES["JPEG"]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _load_key(path: Path) -> bytes:
    """The signing key, made once per data dir (0600) so tokens outlive a restart."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path.read_bytes()
