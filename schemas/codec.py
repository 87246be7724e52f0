"""msgpack with one extension: numpy arrays (docs/PROTOCOL.md, "The ndarray extension").

Ext type 1 carries an array as ``msgpack([dtype, shape])`` followed directly by the raw
C-order bytes. The decoder reads the small header, then views the rest of the ext payload
with ``numpy.frombuffer``: no copy of the array data. Arrays decoded this way are
read-only; copy them before writing in place.

Before decoding, a scan of the msgpack structure (`check_structure`) bounds the work one
body can cost: a million tiny map entries fit in a few megabytes and would take the
decoder, the validator and the error message each a second or more to build.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Optional

import msgpack
import numpy as np

from schemas.errors import ErrorCode, ProtocolError
from schemas.limits import DEFAULT_LIMITS, Limits

EXT_NDARRAY = 1
_MAX_HEADER = 256  # bytes: [dtype, 8 dims of uint64] needs under 100

# Little-endian or byte-order-free dtypes only: a client on any platform can produce them
# and the decoder never has to swap bytes.
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str
    for t in ("bool", "u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")
)


class CodecError(ProtocolError):
    """Bytes that are not a valid vlmq message body."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(code, message)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.asarray(obj, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.str not in ALLOWED_DTYPES:
            raise TypeError(f"ndarray dtype {arr.dtype} cannot go on the wire")
        header = msgpack.packb([arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(EXT_NDARRAY, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "model_dump"):  # pydantic models nested in plain dicts
        return obj.model_dump(exclude_none=True)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _make_ext_hook(limits: Limits):
    def ext_hook(code: int, data: bytes) -> Any:
        if code != EXT_NDARRAY:
            raise CodecError(f"unknown msgpack extension type {code}")
        # Feed only the head: the header is a few dozen bytes, and feeding the whole payload
        # would copy the array once more.
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=_MAX_HEADER)
        unpacker.feed(memoryview(data)[:_MAX_HEADER])
        try:
            dtype_str, shape = unpacker.unpack()
        except Exception as exc:
            raise CodecError(f"ndarray extension header is not [dtype, shape]: {exc}") from None
        if not isinstance(dtype_str, str) or dtype_str not in ALLOWED_DTYPES:
            raise CodecError(
                f"ndarray dtype {dtype_str!r} is not allowed; use one of {sorted(ALLOWED_DTYPES)}"
            )
        # type() is int: a bool is not a dimension
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CodecError(f"ndarray shape must be a list of non-negative ints, got {shape!r}")
        if len(shape) > 8:
            raise CodecError(f"ndarray has {len(shape)} dimensions; at most 8 are allowed")
        dtype = np.dtype(dtype_str)
        offset = unpacker.tell()
        count = math.prod(shape)  # Python ints: a hostile shape cannot wrap around int64
        if count * dtype.itemsize > limits.max_frame_bytes:
            raise CodecError(
                f"ndarray of shape {shape} is {count * dtype.itemsize} bytes; the limit is "
                f"{limits.max_frame_bytes} (VLMQ_MAX_FRAME_BYTES)",
                ErrorCode.TOO_LARGE,
            )
        if count * dtype.itemsize != len(data) - offset:
            raise CodecError(
                f"ndarray of shape {shape} and dtype {dtype_str} needs {count * dtype.itemsize} bytes, "
                f"got {len(data) - offset}"
            )
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))

    return ext_hook


# First bytes 0xc4..0xdf: (what follows, width of the length or count field, fixed payload).
# "skip": a payload of that many bytes (+ 1 for an ext's type byte); "array"/"map": a count.
_WIDE = {
    0xC4: ("skip", 1, 0),
    0xC5: ("skip", 2, 0),
    0xC6: ("skip", 4, 0),  # bin 8/16/32
    0xC7: ("skip", 1, 1),
    0xC8: ("skip", 2, 1),
    0xC9: ("skip", 4, 1),  # ext 8/16/32
    0xCA: ("fixed", 0, 4),
    0xCB: ("fixed", 0, 8),  # float 32/64
    **{0xCC + i: ("fixed", 0, n) for i, n in enumerate((1, 2, 4, 8) * 2)},  # uint, int 8/16/32/64
    **{0xD4 + i: ("fixed", 0, 1 + n) for i, n in enumerate((1, 2, 4, 8, 16))},  # fixext 1/2/4/8/16 + type
    0xD9: ("skip", 1, 0),
    0xDA: ("skip", 2, 0),
    0xDB: ("skip", 4, 0),  # str 8/16/32
    0xDC: ("array", 2, 0),
    0xDD: ("array", 4, 0),
    0xDE: ("map", 2, 0),
    0xDF: ("map", 4, 0),
}
_LENGTH = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


def check_structure(data: bytes, limits: Limits) -> None:
    """Refuse a body with more than `max_body_items` items or nested deeper than
    `max_body_depth`, reading only type bytes and lengths (string, binary and array payloads
    are skipped). Malformed or truncated input is left to the decoder, which says what is
    wrong with it."""
    max_items, max_depth = limits.max_body_items, limits.max_body_depth
    view = memoryview(data)
    end = len(data)
    pos = 0
    items = 0
    todo = [1]  # items still to read at each open nesting level
    while todo:
        if todo[-1] == 0:
            todo.pop()
            continue
        todo[-1] -= 1
        if pos >= end:
            return
        b = view[pos]
        pos += 1
        items += 1
        if items > max_items:
            raise CodecError(
                f"message has more than {max_items} values (VLMQ_MAX_BODY_ITEMS)", ErrorCode.TOO_LARGE
            )
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if b <= 0x9F:  # fixmap 0x80-0x8f, fixarray 0x90-0x9f
            count = (b & 0x0F) * (2 if b <= 0x8F else 1)
        elif b <= 0xBF:  # fixstr
            pos += b & 0x1F
            continue
        else:
            what, width, fixed = _WIDE.get(b, ("", 0, 0))
            if not what:  # 0xc1: never used; the decoder refuses it
                return
            if what == "fixed":
                pos += fixed
                continue
            if pos + width > end:
                return
            n = _LENGTH[width].unpack_from(view, pos)[0]
            pos += width
            if what == "skip":
                pos += n + fixed
                continue
            count = n * (2 if what == "map" else 1)
        if count:
            if count > end - pos:  # each item takes a byte at least: truncated, not large
                return
            if items + count > max_items:
                raise CodecError(
                    f"message has more than {max_items} values (VLMQ_MAX_BODY_ITEMS)", ErrorCode.TOO_LARGE
                )
            if len(todo) > max_depth:
                raise CodecError(
                    f"message nests maps and arrays deeper than {max_depth} (VLMQ_MAX_BODY_DEPTH)",
                    ErrorCode.TOO_LARGE,
                )
            todo.append(count)


_EXT_HOOKS: dict = {}


def packb(obj: Any) -> bytes:
    """Encode a message body (a dict of plain values and ndarrays)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpackb(data: bytes, limits: Optional[Limits] = None) -> Any:
    """Decode a message body; any bad input raises CodecError, never anything else."""
    limits = limits or DEFAULT_LIMITS
    if len(data) > limits.max_message_bytes:
        raise CodecError(
            f"message is {len(data)} bytes; the limit is {limits.max_message_bytes} (VLMQ_MAX_MESSAGE_BYTES)",
            ErrorCode.TOO_LARGE,
        )
    check_structure(data, limits)
    hook = _EXT_HOOKS.get(limits)
    if hook is None:
        hook = _EXT_HOOKS[limits] = _make_ext_hook(limits)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            ext_hook=hook,
            strict_map_key=True,
            max_str_len=limits.max_text_bytes,
            max_array_len=limits.max_body_items,
            max_map_len=limits.max_body_items,
        )
    except CodecError:
        raise
    except UnicodeDecodeError as exc:
        raise CodecError(f"a string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except msgpack.ExtraData:
        raise CodecError("extra bytes after the msgpack value") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        if "exceeds max_str_len" in str(exc):
            raise CodecError(
                f"a string is longer than {limits.max_text_bytes} bytes (VLMQ_MAX_TEXT_BYTES)",
                ErrorCode.TOO_LARGE,
            ) from None
        raise CodecError(f"not valid msgpack: {exc}") from None
    except RecursionError:
        raise CodecError("msgpack value nested too deeply") from None
