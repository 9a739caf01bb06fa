"""Bounded inflation: gzip streams and zip members read with a byte budget, never whole.

A compressed file says nothing true about its inflated size (a 1 MB gzip of zeros inflates to
1 GB), so nothing here asks zlib for more than the caller still accepts: ``GzipReader.read(n)``
inflates at most ``n`` bytes (``decompressobj.decompress(data, max_length)``), and a zip member
is read through ``zipfile``'s own bounded reads, chunk by chunk, counted against a budget. A
file that inflates past its budget is refused (413) the moment it does, with only the budget
held in memory.
"""
from __future__ import annotations

import io
import zipfile
import zlib
from typing import Callable

from ..codecs import CodecError

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
CHUNK = 1 << 20
#: Most members a DICOM zip may hold (counted from the raw bytes before zipfile reads its
#: directory, so that a directory of millions of tiny entries is refused unread).
MAX_MEMBERS = 4096


def bomb(field: str, what: str, budget: int) -> CodecError:
    return CodecError(f"{field}: {what} inflates past {budget} bytes, more than its header announces or "
                      "the size limits allow; send the file as written (a decompression bomb is refused)",
                      413, "array_too_large")


class GzipReader:
    """A gzip stream (several members allowed) read ``n`` inflated bytes at a time."""

    def __init__(self, data: bytes, field: str):
        self.data, self.field, self.pos = data, field, 0
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _truncated(self) -> CodecError:
        return CodecError(f"{self.field}: the gzip stream ends early (truncated); send the complete file")

    def _step(self, want: int) -> bytes | None:
        """Up to ``want`` inflated bytes of the next piece of input (None at the stream's end)."""
        z = self._z
        if z.eof:
            rest = z.unused_data + self.data[self.pos:]
            self.pos = len(self.data)
            if not rest.strip(b"\x00"):  # the end (zero padding after the last member allowed)
                return None
            self._z = z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # another gzip member
            src = rest
        elif z.unconsumed_tail:
            src = z.unconsumed_tail
        elif self.pos < len(self.data):
            src = self.data[self.pos:self.pos + CHUNK]
            self.pos += len(src)
        else:
            raise self._truncated()
        try:
            return z.decompress(src, want)
        except zlib.error:
            raise CodecError(f"{self.field}: not a valid gzip stream (corrupt or truncated); send the "
                             "file as written") from None

    def read(self, n: int) -> bytes:
        """``n`` inflated bytes, or fewer at the end of the stream; never more."""
        out, got = [], 0
        while got < n:
            part = self._step(n - got)
            if part is None:
                break
            out.append(part)
            got += len(part)
        return b"".join(out)


def read_bounded(read, n: int, budget: int, field: str, what: str) -> bytes:
    """``n`` bytes from ``read`` in chunks, refusing (413) past ``budget`` bytes read."""
    if n > budget:
        raise bomb(field, what, budget)
    parts, got = [], 0
    while got < n:
        part = read(min(CHUNK, n - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def ends_within(read, slack: int, field: str, what: str, budget: int) -> None:
    """The stream ends within ``slack`` more bytes (inflated and dropped), else 413."""
    left = slack
    while True:
        part = read(min(CHUNK, left + 1))
        if not part:
            return
        left -= len(part)
        if left < 0:
            raise bomb(field, what, budget)


def open_zip(data: bytes, field: str) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its file members (directories, macOS resource forks, hidden files and a
    DICOMDIR left out), refused unread when it is not a zip or holds over ``MAX_MEMBERS`` entries."""
    if data.count(b"PK\x01\x02") > MAX_MEMBERS:
        raise CodecError(f"{field}: the zip holds more than {MAX_MEMBERS} entries; send one series of at "
                         f"most {MAX_MEMBERS} files", 413, "array_too_large")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, NotImplementedError):
        raise CodecError(f"{field}: not a valid zip archive (corrupt or truncated); send the DICOM series "
                         "as one .zip file, base64") from None
    return zf, [i for i in infos if not i.is_dir() and not _hidden(i.filename)]


def _hidden(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith(".") or parts[-1].upper() == "DICOMDIR"


def member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, field: str) -> Callable[[int], bytes]:
    """A member's ``read(n)``: zipfile inflates at most what is asked, and never past the size
    the member's entry states (a mismatch fails its CRC: corrupt)."""
    try:
        handle = zf.open(info)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, OSError):
        raise CodecError(f"{field}: the zip member {member_name(info)} cannot be opened (encrypted, an "
                         "unknown compression or corrupt); send a plain (stored or deflated) zip") from None

    def read(n: int) -> bytes:
        try:
            return handle.read(n)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError):
            raise CodecError(f"{field}: the zip member {member_name(info)} is corrupt or truncated; send "
                             "the complete archive") from None
    return read


def member_name(info: zipfile.ZipInfo) -> str:
    """A member's file name as a message may show it."""
    name = info.filename.replace("\\", "/").split("/")[-1][:60]
    return repr(name) if name.isprintable() else "<a member>"
