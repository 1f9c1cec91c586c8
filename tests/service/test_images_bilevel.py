"""Bilevel, palette and min-is-white pictures reach the model as a viewer shows them: the
exact pixels of the same drawing sent as a PNG.

A picture's samples mean different things by format and tag: a TIFF's
``PhotometricInterpretation`` says whether 0 is black (min-is-black) or white (min-is-white,
the fax convention), its ``FillOrder`` whether a byte's pixels start at its high bit or its
low bit, a palette maps indices to colours. Pillow reads most combinations right; these
tests pin each one, including those it got wrong:

* a BMP of 4- or 8-bit indices whose palette is all grey (black and white, or a ramp of
  greys) was read as 1-bit (``1``) or 8-bit (``L``) samples, so the 2-colour drawing that
  Pillow itself saves as an 8-bit BMP came out all black;
* 16-bit and 32-bit float min-is-white TIFFs were read as min-is-black: inverted;
* uncompressed palette TIFFs with ``FillOrder`` 2 (1, 2 and 4 bits) and 8-bit min-is-white
  ones were refused (400, "unknown raw mode"), which libtiff and viewers read.

CCITT fax files (Group 3 1-D and 2-D, Group 4, modified Huffman; min-is-white and
min-is-black; either fill order) are written by Pillow through libtiff's own encoder; the
files that Pillow cannot write (4-bit BMP, bit-reversed strips) by the small writers here.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from service.images import decode_image

# An "F" and a dot, white on black: 9 rows of 11 (a width that leaves bits over in each byte).
DRAWING = np.zeros((9, 11), dtype=bool)
DRAWING[1:8, 2] = True
DRAWING[1, 2:9] = True
DRAWING[4, 2:7] = True
DRAWING[7, 9] = True
H, W = DRAWING.shape


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, channels: int = 1, invert: bool = False) -> np.ndarray:
    return decode_image(data, (channels, H, W), max_pixels=1 << 20, invert=invert)


def png_twin(a: np.ndarray = DRAWING) -> bytes:
    return save(Image.fromarray(a), "PNG")


def one_bit() -> Image.Image:
    return Image.fromarray(DRAWING)  # mode "1": 1 is white


def palette_image(colours: list[tuple[int, int, int]], white: int, black: int) -> Image.Image:
    img = Image.fromarray(np.where(DRAWING, white, black).astype(np.uint8), "P")
    img.putpalette([v for c in colours for v in c])
    return img


def pack_rows(values: np.ndarray, bits: int, align: int) -> bytes:
    """Rows of ``bits``-bit values, high bits first, each row padded to ``align`` bytes."""
    out = b""
    for row in values:
        bitrow = np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :].reshape(-1)
        packed = np.packbits(bitrow).tobytes()
        out += packed + b"\0" * (-len(packed) % align)
    return out


def bmp(indices: np.ndarray, bits: int, colours: list[tuple[int, int, int]]) -> bytes:
    """An uncompressed BMP (BITMAPINFOHEADER) of ``bits``-bit palette ``indices``: Pillow
    writes 1- and 8-bit BMPs only."""
    body = pack_rows(indices[::-1], bits, 4)  # bottom-up rows, each a multiple of 4 bytes
    table = b"".join(bytes((b, g, r, 0)) for r, g, b in colours)
    offset = 14 + 40 + len(table)
    head = struct.pack("<2sIHHI", b"BM", offset + len(body), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, W, H, 1, bits, 0, len(body), 2835, 2835, len(colours), 0)
    return head + info + table + body


REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def tiff(
    samples: np.ndarray, bits: int, photometric: int, colour_map: list[int] | None = None
) -> bytes:
    """A one-strip uncompressed little-endian TIFF with ``FillOrder`` 2 (each byte's first
    pixel in its low bits, as fax machines send them): Pillow writes the tag but not the
    bits, so the strip is reversed here."""
    strip = (
        pack_rows(samples, bits, 1) if bits < 8 else samples.astype(np.uint8).tobytes()
    ).translate(REVERSED)
    entries = [
        (256, 3, 1, W),
        (257, 3, 1, H),
        (258, 3, 1, bits),
        (259, 3, 1, 1),  # uncompressed
        (262, 3, 1, photometric),
        (266, 3, 1, 2),  # FillOrder: low bit first
        (273, 4, 1, 0),  # StripOffsets: filled in below
        (277, 3, 1, 1),
        (278, 3, 1, H),
        (279, 4, 1, len(strip)),
    ]
    if colour_map is not None:
        entries.append((320, 3, len(colour_map), 0))  # ColorMap: filled in below
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    table = struct.pack(f"<{len(colour_map)}H", *colour_map) if colour_map else b""
    out = b"II*\0" + struct.pack("<IH", 8, len(entries))
    for tag, kind, count, value in entries:
        if tag == 273:
            value = ifd_end + len(table)
        if tag == 320:
            value = ifd_end
        packed = (
            struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        )
        out += struct.pack("<HHI", tag, kind, count) + packed
    return out + b"\0\0\0\0" + table + strip


def grey_map(levels: list[int]) -> list[int]:
    """A TIFF ColorMap (all reds, then greens, then blues; 16 bits each) of grey ``levels``
    given in 8 bits (× 257: exact once Pillow keeps the high byte)."""
    return [257 * v for v in levels] * 3


CCITT = {
    "group4 min-is-black": lambda: save(one_bit(), "TIFF", compression="group4"),
    "group4 min-is-white": lambda: save(one_bit(), "TIFF", compression="group4", tiffinfo={262: 0}),
    "group4 min-is-white, low bit first": lambda: save(
        one_bit(), "TIFF", compression="group4", tiffinfo={262: 0, 266: 2}
    ),
    "group3 1-D min-is-black": lambda: save(one_bit(), "TIFF", compression="group3"),
    "group3 1-D min-is-white, low bit first": lambda: save(
        one_bit(), "TIFF", compression="group3", tiffinfo={262: 0, 266: 2}
    ),
    "group3 2-D min-is-white, EOLs byte-aligned": lambda: save(
        one_bit(), "TIFF", compression="group3", tiffinfo={262: 0, 292: 5}
    ),
    "modified Huffman min-is-white": lambda: save(
        one_bit(), "TIFF", compression="tiff_ccitt", tiffinfo={262: 0}
    ),
}


@pytest.mark.parametrize("case", list(CCITT))
def test_ccitt_fax_tiffs_give_the_pngs_pixels(case):
    data = CCITT[case]()
    img = Image.open(io.BytesIO(data))
    assert img.mode == "1" and img.tag_v2[259] in (2, 3, 4)  # written CCITT-compressed
    want = DRAWING.astype(np.float32)[None, None]
    np.testing.assert_array_equal(decode(png_twin()), want)
    np.testing.assert_array_equal(decode(data), want)
    np.testing.assert_array_equal(decode(data, invert=True), 1 - want)
    np.testing.assert_array_equal(decode(data, channels=3), np.repeat(want, 3, axis=1))


BLACK_WHITE = [(0, 0, 0), (255, 255, 255)]
# (file, the grey levels the viewer shows: white where the drawing is, black elsewhere)
FILES = {
    # Pillow saves a 2-colour palette picture as 8-bit indices with a 2-entry palette.
    "bmp 8-bit, black and white palette": (
        lambda: save(palette_image(BLACK_WHITE, 1, 0), "BMP"),
        (255, 0),
    ),
    "bmp 4-bit, black and white palette": (
        lambda: bmp(DRAWING.astype(np.uint8), 4, BLACK_WHITE),
        (255, 0),
    ),
    "bmp 4-bit, 16 dark greys (index i is grey i)": (
        lambda: bmp(np.where(DRAWING, 15, 3).astype(np.uint8), 4, [(i, i, i) for i in range(16)]),
        (15, 3),
    ),
    "bmp 8-bit, white and black palette": (
        lambda: save(palette_image([(255, 255, 255), (0, 0, 0)], 0, 1), "BMP"),
        (255, 0),
    ),
    "bmp 1-bit": (lambda: save(one_bit(), "BMP"), (255, 0)),
    # It stores 16-bit and float samples as given, so 0 is white in these files.
    "tiff 16-bit min-is-white": (
        lambda: save(
            Image.fromarray(np.where(DRAWING, 0, 65535).astype(np.uint16)),
            "TIFF",
            tiffinfo={262: 0},
        ),
        (255, 0),
    ),
    "tiff 16-bit min-is-white, deflate": (
        lambda: save(
            Image.fromarray(np.where(DRAWING, 1285, 64250).astype(np.uint16)),  # 5 and 250 × 257
            "TIFF",
            compression="tiff_adobe_deflate",
            tiffinfo={262: 0},
        ),
        (250, 5),
    ),
    "tiff 32-bit float min-is-white": (
        lambda: save(
            Image.fromarray(np.where(DRAWING, 0.0, 1.0).astype(np.float32)),
            "TIFF",
            tiffinfo={262: 0},
        ),
        (255, 0),
    ),
    # Pillow stores an 8-bit (or 1-bit) picture min-is-white as 255 − v, and says so.
    "tiff 8-bit min-is-white": (
        lambda: save(
            Image.fromarray(np.where(DRAWING, 230, 20).astype(np.uint8)),
            "TIFF",
            tiffinfo={262: 0},
        ),
        (230, 20),
    ),
    "tiff 1-bit palette, white and black, low bit first": (
        lambda: tiff(np.where(DRAWING, 0, 1), 1, 3, grey_map([255, 0])),
        (255, 0),
    ),
    "tiff 2-bit palette, low bit first": (
        lambda: tiff(np.where(DRAWING, 2, 1), 2, 3, grey_map([0, 40, 200, 255])),
        (200, 40),
    ),
    "tiff 4-bit palette, low bit first": (
        lambda: tiff(np.where(DRAWING, 9, 0), 4, 3, grey_map([17 * i for i in range(16)])),
        (153, 0),
    ),
    "tiff 8-bit min-is-white, low bit first": (
        lambda: tiff(np.where(DRAWING, 0, 255), 8, 0),
        (255, 0),
    ),
    "tiff 1-bit min-is-white, low bit first": (
        lambda: tiff(np.where(DRAWING, 0, 1), 1, 0),
        (255, 0),
    ),
    "tiff 4-bit min-is-black, low bit first": (
        lambda: tiff(np.where(DRAWING, 12, 1), 4, 1),
        (204, 17),
    ),
}


@pytest.mark.parametrize("case", list(FILES))
def test_palette_and_min_is_white_files_give_the_pngs_pixels(case):
    make, (white, black) = FILES[case]
    twin = np.where(DRAWING, white, black).astype(np.uint8)
    want = (twin.astype(np.float32) / 255)[None, None]
    np.testing.assert_array_equal(decode(png_twin(twin)), want)
    np.testing.assert_array_equal(decode(make()), want)
    np.testing.assert_array_equal(decode(make(), channels=3), np.repeat(want, 3, axis=1))


# ---- over HTTP, on the session's live server (fc: one 8×8 channel) ---------------------------


def prediction(client, data: bytes) -> dict:
    r = client.post("/v1/models/fc:classify", files={"file": ("x", data)}, data={"top_k": "10"})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_uploads_over_http_answer_as_the_png(client):
    """The model answers a fax TIFF, a 2-colour BMP and a min-is-white 16-bit TIFF as it
    answers the PNG: the same probabilities of every class, iterations and residual."""
    png = prediction(client, png_twin())
    for data in (
        CCITT["group4 min-is-white"](),
        CCITT["group3 1-D min-is-white, low bit first"](),
        FILES["bmp 8-bit, black and white palette"][0](),
        FILES["tiff 16-bit min-is-white"][0](),
        FILES["tiff 1-bit palette, white and black, low bit first"][0](),
    ):
        assert prediction(client, data) == png
