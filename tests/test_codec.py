"""The msgpack codec and its ndarray extension."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from schemas.codec import ALLOWED_DTYPES, EXT_NDARRAY, CodecError, packb, unpackb
from schemas.errors import ErrorCode
from schemas.limits import Limits

DTYPES = ["bool", "u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 3, 4), (1, 1, 1, 1, 5)])
def test_ndarray_round_trip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    arr = np.asarray(rng.random(shape) * 100).astype(dtype)
    out = unpackb(packb({"a": arr}))["a"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_decoded_array_is_a_zero_copy_view_of_the_message():
    body = packb({"img": np.arange(12, dtype=np.uint8).reshape(2, 2, 3)})
    img = unpackb(body)["img"]
    assert not img.flags.writeable  # a view on the received bytes, not a copy
    assert img.base is not None


def test_plain_values_and_nesting_round_trip():
    value = {"s": "héllo", "i": -3, "f": 1.5, "b": b"\x00\xff", "n": None, "t": True, "l": [1, [2, {"x": 3}]]}
    assert unpackb(packb(value)) == value


def test_numpy_scalars_become_python_values():
    assert unpackb(packb({"x": np.float32(1.5), "y": np.int64(3)})) == {"x": 1.5, "y": 3}


def test_non_contiguous_and_big_endian_arrays_are_normalised():
    arr = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    out = unpackb(packb(arr))
    assert out.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out, arr)


def test_extension_layout_is_header_then_raw_bytes():
    arr = np.array([[1, 2], [3, 4]], dtype="<u2")
    ext = msgpack.unpackb(packb(arr), ext_hook=lambda code, data: (code, data))
    code, data = ext
    assert code == EXT_NDARRAY
    header = msgpack.packb(["<u2", [2, 2]])
    assert data == header + arr.tobytes()


def test_object_arrays_are_refused_at_encode():
    with pytest.raises(TypeError):
        packb(np.array([object()], dtype=object))


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x92\x01", "not valid msgpack"),  # truncated array
        (b"\xa2\xff\xfe", "UTF-8"),
        (packb({"a": 1}) + b"\x00", "extra bytes"),
        (msgpack.packb(msgpack.ExtType(9, b"x")), "unknown msgpack extension"),
        (
            msgpack.packb(msgpack.ExtType(EXT_NDARRAY, msgpack.packb(["<f4", [2]]) + b"\x00" * 3)),
            "needs 8 bytes",
        ),
        (
            msgpack.packb(msgpack.ExtType(EXT_NDARRAY, msgpack.packb(["|O", [1]]) + b"\x00" * 8)),
            "not allowed",
        ),
        (msgpack.packb(msgpack.ExtType(EXT_NDARRAY, msgpack.packb(["<f4", [-1]]))), "shape"),
        (msgpack.packb(msgpack.ExtType(EXT_NDARRAY, b"\xc1")), "header"),
    ],
)
def test_bad_bytes_raise_codec_error_with_a_reason(data, fragment):
    with pytest.raises(CodecError) as err:
        unpackb(data)
    assert err.value.code == ErrorCode.MALFORMED
    assert fragment in err.value.message


def test_size_limits():
    limits = Limits(max_message_bytes=1000, max_frame_bytes=100)
    with pytest.raises(CodecError) as err:
        unpackb(packb({"x": b"0" * 2000}), limits)
    assert err.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(CodecError) as err:
        unpackb(packb({"x": np.zeros(200, np.uint8)}), limits)
    assert err.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(CodecError) as err:
        unpackb(packb({"x": "y" * 300}), Limits(max_text_bytes=100))
    assert err.value.code == ErrorCode.TOO_LARGE and "VLMQ_MAX_TEXT_BYTES" in err.value.message


def test_every_allowed_dtype_is_little_endian_or_byte_order_free():
    assert all(np.dtype(d).byteorder in ("<", "|", "=") for d in ALLOWED_DTYPES)
