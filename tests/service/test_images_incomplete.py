"""Image files that hold fewer pixels than their headers declare are refused, 400
(``service/images.py``): a decoder must never fill in what the file does not contain.

Each file is a real Fashion-MNIST test image written by Pillow or, where Pillow cannot write
the layout (an interlaced PNG, a TIFF with chosen strips or tiles, an RLE bitmap), by a small
writer here; the damage is then made by hand, as an attacker or a broken upload would. Each
case's complete twin, built the same way, decodes to the plain image's exact pixels, so the
checks refuse the damage and not the layout.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from service_support import metric, metric_samples

from service.images import ImageRejected, decode_image

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed (make test installs it)",
)


def _garment() -> np.ndarray:
    """Fashion-MNIST test image 1 (a pullover), ``(28, 28)`` uint8; zeros without the set."""
    path = FMNIST / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        return np.zeros((28, 28), np.uint8)
    raw = gzip.decompress(path.read_bytes())
    return np.frombuffer(raw[16 + 784 : 16 + 2 * 784], np.uint8).reshape(28, 28)


A = _garment()
G = Image.fromarray(A)
SHAPE = (1, 28, 28)


def decode(data: bytes) -> np.ndarray:
    return decode_image(data, SHAPE, max_pixels=4096 * 4096)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---- PNG: a complete zlib stream that holds fewer scanlines than IHDR declares -------------


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(ihdr: bytes, scanlines: bytes) -> bytes:
    """A PNG whose one ``IDAT`` is ``scanlines`` deflated into a complete zlib stream."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(scanlines))
        + chunk(b"IEND", b"")
    )


def short_png(img: Image.Image, rows: int) -> bytes:
    """Pillow's PNG of ``img`` with only its first ``rows`` scanlines, re-deflated."""
    data = save(img, "PNG")
    ihdr = data[16:29]
    idat = zlib.decompress(data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8])
    return png(ihdr, idat[: rows * (len(idat) // img.height)])


ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def adam7_png(a: np.ndarray, depth: int = 8, passes: int = 7, rows: int = 0) -> bytes:
    """An interlaced grey PNG of ``a`` (Pillow writes none) holding its first ``passes``
    Adam7 passes and ``rows`` rows of the next (filter type 0)."""
    a = a.astype(">u2" if depth == 16 else np.uint8)
    out = b""
    for p, (x0, y0, dx, dy) in enumerate(ADAM7[: passes + 1]):
        lines = [b"\0" + line.tobytes() for line in a[y0::dy, x0::dx]]
        out += b"".join(lines if p < passes else lines[:rows])
    return png(struct.pack(">IIBBBBB", a.shape[1], a.shape[0], depth, 0, 0, 0, 1), out)


A16 = A.astype(np.uint16) * 257  # 16-bit twin: sample / 65535 is exactly sample / 255

# ---- JPEG: the entropy-coded data stops before every block is coded --------------------------


def scans(jpeg: bytes) -> list[int]:
    """Offsets of the SOS markers (0xFF 0xDA never occurs inside entropy-coded data)."""
    return [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xDA]


def eoi_mid_scan(jpeg: bytes, scan: int = 0) -> bytes:
    """``jpeg`` cut halfway through scan ``scan``'s data, with an EOI marker appended."""
    sos = scans(jpeg)
    start = sos[scan]
    end = sos[scan + 1] if scan + 1 < len(sos) else len(jpeg) - 2
    cut = (start + end) // 2
    cut += jpeg[cut - 1] == 0xFF  # never split a stuffed 0xFF 0x00
    return jpeg[:cut] + b"\xff\xd9"


def before_scan(jpeg: bytes, scan: int) -> bytes:
    """``jpeg``'s scans before scan ``scan`` only, then EOI: a well-formed file."""
    return jpeg[: scans(jpeg)[scan]] + b"\xff\xd9"


def jfif_v2(jpeg: bytes) -> bytes:
    """JFIF major version 2: libjpeg warns about the header before any scan."""
    at = jpeg.index(b"JFIF\0") + 5
    return jpeg[:at] + b"\x02" + jpeg[at + 1 :]


def padded(jpeg: bytes, nth: int) -> bytes:
    """``jpeg`` with two zero bytes before the ``nth`` marker after the first scan's header
    (an RSTn, or the segment after the scan): padding that some webcams and encoders leave
    after a restart interval's or a scan's last block, every block decoded."""
    sos = scans(jpeg)[0]
    at = sos + 2 + struct.unpack_from(">H", jpeg, sos + 2)[0]
    found = [i for i in range(at, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] not in (0, 255)]
    return jpeg[: found[nth]] + b"\0\0" + jpeg[found[nth] :]


def padded_everywhere(jpeg: bytes, pad: bytes = b"\0") -> bytes:
    """``jpeg`` with ``pad`` before every marker after the first scan's header but its EOI,
    as a webcam that pads each restart interval writes it."""
    sos = scans(jpeg)[0]
    at = sos + 2 + struct.unpack_from(">H", jpeg, sos + 2)[0]
    found = [i for i in range(at, len(jpeg) - 3) if jpeg[i] == 0xFF and jpeg[i + 1] not in (0, 255)]
    for i in reversed(found):
        jpeg = jpeg[:i] + pad + jpeg[i:]
    return jpeg


def eoi_mid_last_interval(jpeg: bytes) -> bytes:
    """``jpeg`` cut halfway through its last restart interval, with an EOI appended."""
    rst = [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and 0xD0 <= jpeg[i + 1] <= 0xD7]
    cut = (rst[-1] + len(jpeg) - 2) // 2
    cut += jpeg[cut - 1] == 0xFF  # never split a stuffed 0xFF 0x00
    return jpeg[:cut] + b"\xff\xd9"


def cut_at_restart(jpeg: bytes, nth: int) -> bytes:
    """``jpeg`` ended by an EOI in place of its ``nth`` RSTn marker: whole intervals lost."""
    rst = [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and 0xD0 <= jpeg[i + 1] <= 0xD7]
    return jpeg[: rst[nth]] + b"\xff\xd9"


BASELINE = save(G, "JPEG", quality=90)
BASELINE_RGB = save(G.convert("RGB"), "JPEG", quality=90)
RESTARTS = save(G.convert("RGB"), "JPEG", quality=90, restart_marker_blocks=1)
CMYK = save(G.convert("CMYK"), "JPEG", quality=90)
PROGRESSIVE = save(G.convert("RGB"), "JPEG", quality=90, progressive=True)

# ---- TIFF: strips or tiles missing or short ------------------------------------------------


def tiff(
    chunks: list[bytes | None],
    *,
    compression: int = 1,
    rows_per_strip: int | None = None,
    tile: tuple[int, int] | None = None,
    counts: list[int] | None = None,
) -> bytes:
    """A little-endian 28×28 8-bit grey TIFF of the encoded ``chunks`` (strips, or tiles of
    ``tile`` = (width, height)); ``None`` is a chunk at offset 0 with no bytes; ``counts``
    replaces the byte counts written."""
    body, offsets = b"", []
    for c in chunks:
        offsets.append(8 + len(body) if c is not None else 0)
        body += c or b""
    body += b"\0" * (len(body) & 1)
    counts = [len(c or b"") for c in chunks] if counts is None else counts
    tags = [(256, 4, [28]), (257, 4, [28]), (258, 3, [8]), (259, 3, [compression])]
    tags += [(262, 3, [1]), (277, 3, [1])]
    if tile:
        tags += [(322, 4, [tile[0]]), (323, 4, [tile[1]]), (324, 4, offsets), (325, 4, counts)]
    else:
        tags += [(273, 4, offsets), (278, 4, [rows_per_strip or 28]), (279, 4, counts)]
    ifd_at = 8 + len(body)
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    ifd, extra = struct.pack("<H", len(tags)), b""
    for tag, kind, values in tags:
        raw = struct.pack("<" + ("H" if kind == 3 else "I") * len(values), *values)
        if len(raw) <= 4:
            ifd += struct.pack("<HHI", tag, kind, len(values)) + raw.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, len(values), extra_at + len(extra))
            extra += raw
    return b"II*\0" + struct.pack("<I", ifd_at) + body + ifd + b"\0\0\0\0" + extra


STRIPS = [A[y : y + 7].tobytes() for y in range(0, 28, 7)]
PADDED = np.zeros((32, 32), np.uint8)
PADDED[:28, :28] = A
TILES = [PADDED[y : y + 16, x : x + 16].tobytes() for y in (0, 16) for x in (0, 16)]


def jpeg_tiff_cut_mid_scan() -> bytes:
    """A JPEG-compressed TIFF (Pillow, through libtiff) whose strip has an EOI mid-scan."""
    data = bytearray(save(G.convert("RGB").resize((64, 64)), "TIFF", compression="jpeg"))
    tags = Image.open(io.BytesIO(bytes(data))).tag_v2
    offset, count = tags[273][0], tags[279][0]
    strip = eoi_mid_scan(bytes(data[offset : offset + count]))
    data[offset : offset + len(strip)] = strip  # the rest of the strip is left as junk
    return bytes(data)


# ---- GIF, BMP, WebP --------------------------------------------------------------------------


def gif_rows(rows: int) -> bytes:
    """The GIF of the garment whose LZW stream codes only its first ``rows`` rows (with its
    end code): the data sub-blocks of the top ``rows`` rows' own GIF, same palette."""

    def split(gif: bytes) -> tuple[bytes, bytes, bytes]:
        at = 13 + 3 * (2 << (gif[10] & 7)) * (gif[10] >> 7)
        while gif[at] == 0x21:  # extension blocks before the image
            at += 2
            while gif[at]:
                at += 1 + gif[at]
            at += 1
        at += 10 + (3 * (2 << (gif[at + 9] & 7)) if gif[at + 9] & 0x80 else 0) + 1
        end = at
        while gif[end]:
            end += 1 + gif[end]
        return gif[:at], gif[at : end + 1], gif[end + 1 :]

    head, _, tail = split(save(G, "GIF"))
    return head + split(save(Image.fromarray(A[:rows]), "GIF"))[1] + tail


def bmp_rle8(rows: list[bytes], end_of_bitmap: bool = True) -> bytes:
    """A 28×28 8-bit RLE bitmap (bottom-up) coding ``rows``, the picture's bottom rows."""
    rle = b"".join(b"".join(bytes((1, v)) for v in r) + b"\0\0" for r in rows[::-1])
    rle += b"\0\1" if end_of_bitmap else b""
    grey = b"".join(bytes((i, i, i, 0)) for i in range(256))
    at = 14 + 40 + len(grey)
    info = struct.pack("<IiiHHIIiiII", 40, 28, 28, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", at + len(rle), 0, 0, at) + info + grey + rle


def webp_payload_cut() -> bytes:
    """A lossy WebP whose VP8 payload is cut to 60%, its RIFF and chunk sizes made to fit."""
    data = save(G, "WEBP", quality=90)
    payload = data[20 : 20 + struct.unpack_from("<I", data, 16)[0]]
    payload = payload[: len(payload) * 6 // 10]
    body = b"WEBP" + data[12:16] + struct.pack("<I", len(payload)) + payload
    body += b"\0" * (len(payload) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


ROWS = [bytes(r) for r in A]

INCOMPLETE = {
    # PNG: the reported defect, in each bit depth and layout
    "png-8bit-grey-14-of-28-rows": (short_png(G, 14), "PNG", "ends after 14 of its 28 rows"),
    "png-rgb-27-of-28-rows": (short_png(G.convert("RGB"), 27), "PNG", "after 27 of its 28 rows"),
    "png-palette-14-rows": (short_png(G.convert("P"), 14), "PNG", "after 14 of its 28 rows"),
    "png-1bit-14-rows": (short_png(G.convert("1"), 14), "PNG", "after 14 of its 28 rows"),
    "png-16bit-14-rows": (short_png(Image.fromarray(A16), 14), "PNG", "after 14 of its 28 rows"),
    "png-adam7-6-of-7-passes": (adam7_png(A, passes=6), "PNG", "ends after 431 of its 837 bytes"),
    "png-adam7-16bit-mid-pass": (
        adam7_png(A16, 16, passes=5, rows=3),
        "PNG",
        "ends after 504 of its 1621 bytes",
    ),
    "png-file-cut": (save(G, "PNG")[:300], "PNG", "its pixel data ends before the picture does"),
    # JPEG: libjpeg decodes the blocks a scan does not reach as flat grey
    "jpeg-baseline-eoi-mid-scan": (eoi_mid_scan(BASELINE), "JPEG", "premature end of data"),
    "jpeg-baseline-rgb-eoi-mid-scan": (eoi_mid_scan(BASELINE_RGB), "JPEG", "premature end"),
    "jpeg-restart-markers-eoi-mid-scan": (eoi_mid_scan(RESTARTS), "JPEG", "premature end"),
    "jpeg-cmyk-eoi-mid-scan": (eoi_mid_scan(CMYK), "JPEG", "premature end of data segment"),
    "jpeg-eoi-mid-scan-after-jfif-warning": (
        jfif_v2(eoi_mid_scan(BASELINE)),
        "JPEG",
        "premature end of data segment",
    ),
    "jpeg-progressive-last-scan-cut": (
        eoi_mid_scan(PROGRESSIVE, len(scans(PROGRESSIVE)) - 1),
        "JPEG",
        "premature end of data segment",
    ),
    "jpeg-progressive-first-scan-only": (
        before_scan(PROGRESSIVE, 1),
        "JPEG",
        "its scans never code all of component 1's coefficients",
    ),
    "jpeg-progressive-last-scan-dropped": (
        before_scan(PROGRESSIVE, len(scans(PROGRESSIVE)) - 1),
        "JPEG",
        "never code all of component",
    ),
    "jpeg-file-cut": (BASELINE[:400], "JPEG", "its pixel data ends before the picture does"),
    # Padding before an earlier marker: libjpeg stops at it, the cut after it is still found
    "jpeg-padding-before-rst1-then-eoi-mid-interval": (
        eoi_mid_last_interval(padded(RESTARTS, 1)),
        "JPEG",
        "its scan data stops before its last block, after padding before a marker",
    ),
    "jpeg-padding-before-rst1-then-eoi-for-rst": (
        cut_at_restart(padded(RESTARTS, 1), 2),
        "JPEG",
        "scan 0 holds 3 of its 4 restart intervals",
    ),
    "jpeg-padding-before-every-rst-then-eoi-mid-interval": (
        eoi_mid_last_interval(padded_everywhere(RESTARTS, b"\0\0")),
        "JPEG",
        "its scan data stops before its last block, after padding before a marker",
    ),
    "jpeg-padding-before-progressive-sos-then-last-scan-cut": (
        eoi_mid_scan(padded(PROGRESSIVE, 1), len(scans(PROGRESSIVE)) - 1),
        "JPEG",
        "its scan data stops before its last block, after padding before a marker",
    ),
    # GIF: Pillow's LZW decoder already wants the missing pixels
    "gif-lzw-10-of-28-rows": (gif_rows(10), "GIF", "its pixel data ends before the picture"),
    # BMP
    "bmp-file-cut": (save(G, "BMP")[:500], "BMP", "its pixel data ends before the picture does"),
    "bmp-rle8-end-of-bitmap-after-14-rows": (
        bmp_rle8(ROWS[14:]),
        "BMP",
        "its pixel data ends before the picture does: not enough image data",
    ),
    # TIFF: Pillow's own (uncompressed) reader leaves what it is not given black
    "tiff-2-of-4-strips-listed": (
        tiff(STRIPS[:2], rows_per_strip=7),
        "TIFF",
        "it lists 2 of the 4 strips its 28×28 pixels need",
    ),
    "tiff-strip-at-offset-0": (
        tiff([STRIPS[0], None, *STRIPS[2:]], rows_per_strip=7),
        "TIFF",
        "strip 1 is missing (offset 0, 0 bytes)",
    ),
    "tiff-last-strip-3-of-7-rows": (
        tiff([*STRIPS[:3], STRIPS[3][: 3 * 28]], rows_per_strip=7),
        "TIFF",
        "strip 3 holds 84 of the 196 bytes its rows need",
    ),
    "tiff-byte-count-short": (
        tiff(STRIPS, rows_per_strip=7, counts=[196, 196, 196, 50]),
        "TIFF",
        "strip 3 holds 50 of the 196 bytes its rows need",
    ),
    "tiff-3-of-4-tiles-listed": (
        tiff(TILES[:3], tile=(16, 16)),
        "TIFF",
        "it lists 3 of the 4 tiles its 28×28 pixels need",
    ),
    "tiff-tile-at-offset-0": (
        tiff([*TILES[:2], None, TILES[3]], tile=(16, 16)),
        "TIFF",
        "tile 2 is missing (offset 0, 0 bytes)",
    ),
    "tiff-jpeg-strip-eoi-mid-scan": (
        jpeg_tiff_cut_mid_scan(),
        "TIFF",
        "strip 0: libjpeg: Corrupt JPEG data: premature end of data segment",
    ),
}


@pytest.mark.parametrize("data,fmt,words", INCOMPLETE.values(), ids=INCOMPLETE.keys())
def test_incomplete_pixel_data_is_refused(data, fmt, words):
    with pytest.raises(ImageRejected) as e:
        decode(data)
    assert e.value.status == 400
    assert str(e.value).startswith(f"the uploaded {fmt} image is incomplete (")
    assert words in str(e.value)


@pytest.mark.parametrize(
    "data,words",
    [
        # libtiff refuses a deflated strip that inflates short (and says why on stderr only).
        (
            tiff(
                [*map(zlib.compress, STRIPS[:3]), zlib.compress(STRIPS[3][:84])],
                compression=8,
                rows_per_strip=7,
            ),
            "the uploaded TIFF image could not be decoded (decoder error -2)",
        ),
        (webp_payload_cut(), "the uploaded WEBP image could not be decoded"),
    ],
    ids=["tiff-deflate-strip-short", "webp-vp8-payload-cut"],
)
def test_incomplete_data_other_decoders_refuse(data, words):
    with pytest.raises(ImageRejected) as e:
        decode(data)
    assert e.value.status == 400 and words in str(e.value)


TWIN = A.astype(np.float32) / 255.0


def jpeg_twin(data: bytes) -> np.ndarray:
    """What the service should make of a JPEG: Pillow's decode, as luma, / 255."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0


COMPLETE = {
    "png-adam7": (adam7_png(A), TWIN),
    "png-adam7-16bit": (adam7_png(A16, 16), TWIN),
    "png-adam7-1x1": (adam7_png(A[:1, :1]), None),
    "tiff-strips": (tiff(STRIPS, rows_per_strip=7), TWIN),
    "tiff-tiles": (tiff(TILES, tile=(16, 16)), TWIN),
    "tiff-deflate-strips": (
        tiff([zlib.compress(s) for s in STRIPS], compression=8, rows_per_strip=7),
        TWIN,
    ),
    "bmp-rle8": (bmp_rle8(ROWS), TWIN),
    "bmp-rle8-without-end-of-bitmap": (bmp_rle8(ROWS, end_of_bitmap=False), TWIN),
    "gif": (gif_rows(28), TWIN),
    "jpeg-baseline": (BASELINE, jpeg_twin(BASELINE)),
    "jpeg-rgb": (BASELINE_RGB, jpeg_twin(BASELINE_RGB)),
    "jpeg-restart-markers": (RESTARTS, jpeg_twin(RESTARTS)),
    "jpeg-padding-before-rst1": (padded(RESTARTS, 1), jpeg_twin(RESTARTS)),
    "jpeg-padding-before-progressive-sos": (padded(PROGRESSIVE, 1), jpeg_twin(PROGRESSIVE)),
    "jpeg-padding-before-every-rst": (padded_everywhere(RESTARTS), jpeg_twin(RESTARTS)),
    "jpeg-0xff-fill-before-every-rst": (
        padded_everywhere(RESTARTS, b"\xff\xff"),
        jpeg_twin(RESTARTS),
    ),
    "jpeg-padding-before-every-progressive-marker": (
        padded_everywhere(PROGRESSIVE, b"\0\0"),
        jpeg_twin(PROGRESSIVE),
    ),
    "jpeg-progressive": (PROGRESSIVE, jpeg_twin(PROGRESSIVE)),
    "jpeg-jfif-v2": (jfif_v2(BASELINE), jpeg_twin(BASELINE)),
    "jpeg-cmyk": (CMYK, None),
    "tiff-jpeg": (save(G.convert("RGB"), "TIFF", compression="jpeg"), None),
    "mpo": (save(G.convert("RGB"), "MPO", save_all=True, append_images=[G.convert("RGB")]), None),
}


@pytest.mark.parametrize("data,want", COMPLETE.values(), ids=COMPLETE.keys())
def test_complete_twins_decode(data, want):
    """Each incomplete case's complete twin, built the same way, is read whole."""
    got = decode(data)
    assert got.shape == (1, *SHAPE) and got.dtype == np.float32
    if want is not None:
        np.testing.assert_array_equal(got[0, 0], want)


def test_pillow_never_loads_truncated_images():
    """``LOAD_TRUNCATED_IMAGES`` would make Pillow fill every truncated file with black."""
    import service.app  # noqa: F401  (the whole server, as it runs)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_incomplete_upload_over_http(client):
    """The reported defect end to end: 400 with the reason, counted as a 400, the server
    answering the complete file straight after."""
    before = metric_samples(client.get("/metrics").text)
    r = client.post("/v1/models/fc:classify", files={"file": ("x.png", short_png(G, 14))})
    assert r.status_code == 400
    assert r.json()["error"] == (
        "the uploaded PNG image is incomplete (its image data ends after 14 of its 28 rows)"
    )
    r = client.post("/v1/models/fc:classify", files={"file": ("x.png", save(G, "PNG"))})
    assert r.status_code == 200
    after = metric_samples(client.get("/metrics").text)
    key = {"endpoint": "v1_classify", "code": "400"}
    assert metric(after, "mondeq_requests_total", **key) == (
        metric(before, "mondeq_requests_total", **key) + 1
    )


@pytest.mark.parametrize(
    "data,message",
    [
        (
            eoi_mid_last_interval(padded(RESTARTS, 1)),
            "the uploaded JPEG image is incomplete (its scan data stops before its last block, "
            "after padding before a marker)",
        ),
        (
            cut_at_restart(padded(RESTARTS, 1), 2),
            "the uploaded JPEG image is incomplete (scan 0 holds 3 of its 4 restart intervals)",
        ),
    ],
    ids=["mid-interval", "at-an-interval-end"],
)
def test_cut_after_jpeg_padding_exact_answer(data, message):
    """Padding before RST1 once made libjpeg's check stop there: the cut after it went
    unseen (200, the lost blocks grey). Status and message, exactly."""
    with pytest.raises(ImageRejected) as e:
        decode(data)
    assert (e.value.status, str(e.value)) == (400, message)


def test_cut_after_jpeg_padding_over_http(client):
    """The same upload through the live server: 400 with the exact reason; its complete,
    padded twin is answered."""
    r = client.post(
        "/v1/models/fc:classify",
        files={"file": ("x.jpg", eoi_mid_last_interval(padded(RESTARTS, 1)))},
    )
    assert r.status_code == 400
    assert r.json()["error"] == (
        "the uploaded JPEG image is incomplete (its scan data stops before its last block, "
        "after padding before a marker)"
    )
    r = client.post("/v1/models/fc:classify", files={"file": ("x.jpg", padded(RESTARTS, 1))})
    assert r.status_code == 200


# ---- GIF, BMP, WebP cut in their headers: "incomplete", not "not an image" ------------------
#
# Pillow takes a WebP cut anywhere, and a GIF or BMP cut before its pixel data, for foreign
# bytes; an animated GIF cut in a later frame's header made it raise "index out of range".
# Each was 400 with words that blamed the format, not the cut.

WEBP_LOSSY = save(G, "WEBP", quality=90)
WEBP_LOSSLESS = save(G, "WEBP", lossless=True)
WEBP_ALPHA = save(G.convert("RGBA"), "WEBP", quality=90)  # VP8X, ALPH, VP8
GIF = save(G, "GIF")
GIF_INTERLACED = save(G, "GIF", interlace=True)
BMP_GREY = save(G, "BMP")  # 256-entry colour table, pixels at byte 1078
FRAMES = [Image.fromarray(np.roll(A, 5 * i, axis=1)) for i in range(3)]
ANIMATED_GIF = save(FRAMES[0], "GIF", save_all=True, append_images=FRAMES[1:], duration=100)


def webp_chunk_cut(data: bytes, keep: int) -> bytes:
    """``data`` cut ``keep`` bytes into its first chunk's data, its RIFF size made to fit (a
    tool that rewrites the size it sees) but not the chunk's own."""
    return b"RIFF" + struct.pack("<I", 12 + keep) + data[8 : 20 + keep]


def second_descriptor(gif: bytes) -> int:
    """Offset of an animated GIF's second image descriptor (0x2C after frame 1's data)."""
    at = gif.index(b"\x2c", 13 + 3 * 256)  # Pillow writes a 256-entry colour table
    at += 10 + 1  # descriptor, LZW code size (no local table)
    while gif[at]:
        at += 1 + gif[at]
    at += 1
    while gif[at] == 0x21:  # the second frame's graphic control extension
        at += 2
        while gif[at]:
            at += 1 + gif[at]
        at += 1
    assert gif[at] == 0x2C
    return at


CUT_SHORT = {
    "webp-lossy-cut": (
        WEBP_LOSSY[:100],
        f"the uploaded WEBP image is incomplete (the file ends after 100 of the "
        f"{len(WEBP_LOSSY)} bytes its RIFF header declares)",
    ),
    "webp-lossless-cut": (
        WEBP_LOSSLESS[:-1],
        f"the uploaded WEBP image is incomplete (the file ends after {len(WEBP_LOSSLESS) - 1} "
        f"of the {len(WEBP_LOSSLESS)} bytes its RIFF header declares)",
    ),
    "webp-alpha-cut-in-alph": (
        WEBP_ALPHA[:60],
        f"the uploaded WEBP image is incomplete (the file ends after 60 of the "
        f"{len(WEBP_ALPHA)} bytes its RIFF header declares)",
    ),
    "webp-riff-size-rewritten-chunk-cut": (
        webp_chunk_cut(WEBP_LOSSY, 50),
        "the uploaded WEBP image is incomplete (its VP8 chunk declares "
        f"{struct.unpack_from('<I', WEBP_LOSSY, 16)[0]} bytes; the file holds 50)",
    ),
    "gif-cut-in-colour-table": (
        GIF[:100],
        "the uploaded GIF image is incomplete (the file ends after 100 bytes, inside its "
        "global colour table)",
    ),
    "gif-cut-before-any-image": (
        GIF[: 13 + 3 * 256],
        "the uploaded GIF image is incomplete (the file ends after 781 bytes, before any image)",
    ),
    "animated-gif-cut-in-frame-2-descriptor": (
        ANIMATED_GIF[: second_descriptor(ANIMATED_GIF) + 5],
        f"the uploaded GIF image is incomplete (the file ends after "
        f"{second_descriptor(ANIMATED_GIF) + 5} bytes, inside image 2's descriptor)",
    ),
    "bmp-cut-in-info-header": (
        BMP_GREY[:40],
        "the uploaded BMP image is incomplete (the file ends after 40 bytes, inside its headers)",
    ),
}


@pytest.mark.parametrize("data,message", CUT_SHORT.values(), ids=CUT_SHORT.keys())
def test_cut_in_header_is_incomplete(data, message):
    """Status and message, exactly."""
    with pytest.raises(ImageRejected) as e:
        decode(data)
    assert (e.value.status, str(e.value)) == (400, message)


@pytest.mark.parametrize(
    "data,fmt,signature",
    [
        (GIF, "GIF", 6),
        (GIF_INTERLACED, "GIF", 6),
        (save(G, "GIF", transparency=0), "GIF", 6),
        (BMP_GREY, "BMP", 2),
        (save(G.convert("RGB"), "BMP"), "BMP", 2),
        (save(G.convert("1"), "BMP"), "BMP", 2),
        (bmp_rle8(ROWS), "BMP", 2),
        (WEBP_LOSSY, "WEBP", 12),
        (WEBP_LOSSLESS, "WEBP", 12),
        (WEBP_ALPHA, "WEBP", 12),
    ],
    ids=[
        "gif",
        "gif-interlaced",
        "gif-transparency",
        "bmp-grey",
        "bmp-rgb",
        "bmp-1bit",
        "bmp-rle8",
        "webp-lossy",
        "webp-lossless",
        "webp-lossy-alpha",
    ],
)
def test_every_cut_is_refused_as_incomplete_or_changes_nothing(data, fmt, signature):
    """Each prefix of a valid file, from its whole signature on (a shorter one names no
    format), is 400 "incomplete" or, cut only after its last pixel (a GIF's trailer, a
    BMP's last row padding, bytes a VP8 stream never reads), the complete file's answer:
    never a picture with pixels filled in, never "not an image"."""
    whole = decode(data)
    answers = set()
    for cut in range(signature, len(data)):
        try:
            got = decode(data[:cut])
        except ImageRejected as e:
            assert e.status == 400, (cut, str(e))
            assert str(e).startswith(f"the uploaded {fmt} image is incomplete ("), (cut, str(e))
            answers.add(400)
        else:
            np.testing.assert_array_equal(got, whole, err_msg=f"cut at {cut}")
            answers.add(200)
    assert 400 in answers


def test_cut_webp_over_http(client):
    """A WebP upload cut short through the live server: 400 with the exact reason (it had
    been "not a PNG, JPEG, GIF, WebP, BMP or TIFF image"); the whole file is answered."""
    r = client.post("/v1/models/fc:classify", files={"file": ("x.webp", WEBP_LOSSY[:100])})
    assert r.status_code == 400
    assert r.json()["error"] == (
        f"the uploaded WEBP image is incomplete (the file ends after 100 of the "
        f"{len(WEBP_LOSSY)} bytes its RIFF header declares)"
    )
    r = client.post("/v1/models/fc:classify", files={"file": ("x.webp", WEBP_LOSSY)})
    assert r.status_code == 200
