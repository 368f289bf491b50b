"""The zip ``torch.save`` writes, read by one bounded reader: for torch files and DCP chunks.

A ``torch.save`` file (torch >= 1.6) is a zip of stored records (``<archive>/data.pkl``, the
pickle; ``<archive>/data/<key>``, each storage's bytes; ``byteorder``, ``version``); a DCP
``.distcp`` file holds one such zip per chunk, at a byte range. :class:`TorchZip` reads the
zip lying in ``[0, length)`` of whatever ``read(at, n)`` gives (a whole file, or a window of
one): its directory is bounded before it is parsed (a record count and a directory size
limit), every record's local header is checked where the directory says, and its data span
must lie inside the zip. Nothing is inflated unless asked, and then never past a limit.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LOCAL_HEADER", "Record", "TorchZip", "ZipStructureError"]

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory, 22 bytes
_LOCATOR = struct.Struct("<4sLQL")  # zip64 end-of-directory locator, 20 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory, 56 bytes
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory entry, 46 bytes + name/extra
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, 30 bytes + name/extra
LOCAL_HEADER = _LOCAL.size
_MAX_COMMENT = 0xFFFF
_INFLATE_STEP = 1 << 20


class ZipStructureError(ValueError):
    """The zip's structure is broken or beyond its limits (the caller words the refusal)."""


@dataclass(frozen=True)
class Record:
    """One record: compression ``method`` (0 stored, 8 deflated), ``flags``, compressed and
    uncompressed sizes, and where its local header starts (relative to the zip)."""

    name: str
    method: int
    flags: int
    csize: int
    size: int
    header: int

    @property
    def stored(self) -> bool:
        return self.method == 0 and not self.flags & 1


class TorchZip:
    """The zip in ``[0, length)`` of ``read``: its records by name, checked on opening.

    ``max_records`` and ``max_directory`` bound the directory before it is read (a torch file
    has a record a tensor; a DCP chunk 5 to 8). Raises :class:`ZipStructureError`.

    Example:
        >>> import io, torch
        >>> buf = io.BytesIO(); torch.save(torch.ones(2), buf); raw = buf.getvalue()
        >>> z = TorchZip(lambda at, n: raw[at : at + n], len(raw))
        >>> sorted(n.split("/", 1)[1] for n in z.records if "data" in n)
        ['.data/serialization_id', 'data.pkl', 'data/0']
    """

    def __init__(
        self,
        read: Callable[[int, int], bytes],
        length: int,
        *,
        max_records: int | None = None,
        max_directory: int = 1 << 30,
    ) -> None:
        self._read, self.length = read, length
        try:
            self.records, self.directory = _directory(self.read, length, max_records, max_directory)
        except (struct.error, UnicodeDecodeError) as e:
            raise ZipStructureError(f"a broken directory ({e})") from None

    def read(self, at: int, n: int) -> bytes:
        """``n`` bytes at ``at`` of the zip, refused past its end."""
        if at < 0 or n < 0 or at + n > self.length:
            raise ZipStructureError(f"a zip structure points past its end (byte {at})")
        data = self._read(at, n)
        if len(data) != n:
            raise ZipStructureError("the file ended early")
        return data

    def data_start(self, rec: Record) -> int:
        """Where ``rec``'s data starts, from its local header (checked to name it)."""
        sig, *_, name_len, extra_len = _LOCAL.unpack(self.read(rec.header, _LOCAL.size))
        if (
            sig != b"PK\x03\x04"
            or self.read(rec.header + _LOCAL.size, name_len) != rec.name.encode()
        ):
            raise ZipStructureError(f"no local header for '{rec.name}' where the directory says")
        return rec.header + _LOCAL.size + name_len + extra_len

    def inflate(self, rec: Record, limit: int) -> bytes:
        """A deflated record's bytes, never inflating past ``limit + 1`` bytes."""
        if rec.method != 8 or rec.flags & 1:
            raise ZipStructureError(
                f"record '{rec.name}' is encrypted or compressed with method {rec.method}"
            )
        start, left = self.data_start(rec), rec.csize
        d = zlib.decompressobj(-15)
        out = bytearray()
        try:
            while left and len(out) <= limit:
                chunk = self.read(start, min(left, _INFLATE_STEP))
                start, left = start + len(chunk), left - len(chunk)
                out += d.decompress(chunk, limit + 1 - len(out))
                while d.unconsumed_tail and len(out) <= limit:
                    out += d.decompress(d.unconsumed_tail, limit + 1 - len(out))
        except zlib.error as e:
            raise ZipStructureError(f"record '{rec.name}' does not inflate ({e})") from None
        return bytes(out)


def _directory(
    read: Callable[[int, int], bytes], length: int, max_records: int | None, max_directory: int
) -> tuple[dict[str, Record], int]:
    """The records by name and where the central directory starts, bounded before parsing."""
    count, cd_size, cd_start = _end_record(read, length)
    if (max_records is not None and count > max_records) or cd_size > max_directory:
        raise ZipStructureError(f"{count} records in {cd_size} bytes, more than a torch.save zip")
    cd = read(cd_start, cd_size)
    out: dict[str, Record] = {}
    pos = 0
    for _ in range(count):
        e = _CENTRAL.unpack_from(cd, pos)
        if e[0] != b"PK\x01\x02":
            raise ZipStructureError("a broken directory entry")
        name_len, extra_len, comment_len = e[10], e[11], e[12]
        name = cd[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len].decode("utf-8")
        extra = cd[pos + _CENTRAL.size + name_len : pos + _CENTRAL.size + name_len + extra_len]
        size, csize, header = _zip64(extra, e[9], e[8], e[16])
        if name in out:
            raise ZipStructureError(f"record '{name}' twice")
        out[name] = Record(name, e[4], e[3], csize, size, header)
        pos += _CENTRAL.size + name_len + extra_len + comment_len
    return out, cd_start


def _end_record(read: Callable[[int, int], bytes], length: int) -> tuple[int, int, int]:
    """(record count, directory size, directory start) from the end-of-directory record
    (after at most a 64 KB comment), or its zip64 form."""
    if length < _EOCD.size:
        raise ZipStructureError("too short for a zip")
    tail_len = _EOCD.size  # the common case, no comment: 22 bytes read
    tail = read(length - tail_len, tail_len)
    if tail[:4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
        tail_len = min(length, _EOCD.size + _MAX_COMMENT)
        tail = read(length - tail_len, tail_len)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and at + _EOCD.size + _EOCD.unpack_from(tail, at)[-1] != tail_len:
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise ZipStructureError("no end-of-directory record at its end")
    _, _, _, _, count, cd_size, cd_start, _ = _EOCD.unpack_from(tail, at)
    eocd = length - tail_len + at
    locator = read(eocd - _LOCATOR.size, _LOCATOR.size) if eocd >= _LOCATOR.size else b""
    has_locator = locator[:4] == b"PK\x06\x07"  # a zip64 locator is read wherever it is
    if has_locator or count == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_start):
        if not has_locator:
            raise ZipStructureError("a broken zip64 locator")
        _, _, eocd64, disks = _LOCATOR.unpack(locator)
        if disks > 1:
            raise ZipStructureError(f"a zip64 locator claiming {disks} disks")
        fields = _EOCD64.unpack(read(eocd64, _EOCD64.size))
        if fields[0] != b"PK\x06\x06":
            raise ZipStructureError("a broken zip64 directory record")
        count, cd_size, cd_start = fields[7], fields[8], fields[9]
    return count, cd_size, cd_start


def _zip64(extra: bytes, *values: int) -> tuple[int, ...]:
    """Sizes and offset from a zip64 extra field, where the 32-bit ones are 0xFFFFFFFF."""
    out = list(values)
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            field = pos + 4
            for i, v in enumerate(out):
                if v == 0xFFFFFFFF:
                    (out[i],) = struct.unpack_from("<Q", extra, field)
                    field += 8
        pos += 4 + size
    return tuple(out)
