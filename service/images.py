"""Uploaded image files → model input pixels, as an image viewer shows them.

A file's samples are not always the picture a viewer displays: a 16-bit sample of 65535 is
white, a pixel under alpha 0 is not seen whatever colour it hides, an EXIF ``Orientation``
tag turns the picture, an ICC profile or PNG ``gAMA`` chunk changes the displayed tone. The
model must see the displayed picture, so that two files that look the same get the same
answer. :func:`decode_image` decodes with Pillow and applies, in this order:

1. **Format.** PNG, JPEG (MPO included), GIF, WebP, BMP and TIFF; anything else is 400.
   Width × height over the server's ``max_image_pixels`` (or over Pillow's decompression-bomb
   limit) is 413, decided from the header before any pixel is decoded; so is a PNG text or
   ICC chunk that inflates past Pillow's ``MAX_TEXT_CHUNK``. A file that holds fewer pixels
   than its header declares is 400, "incomplete", never a picture with the rest filled in
   (black rows, grey blocks, a blur): a file that ends early, a PNG zlib stream that ends
   before its last scanline (any bit depth, interlaced or not), a JPEG scan cut short by a
   marker or progressive scans that never code every coefficient, a GIF LZW stream or BMP
   RLE data that stops early, a TIFF strip or tile missing or short, a WebP shorter than
   its RIFF sizes declare, a GIF or BMP cut in its headers or colour table.
2. **Frames.** An animation (GIF, APNG, WebP) or a multi-page TIFF has no single picture to
   classify: 422. An MPO (a camera JPEG carrying a second view or a depth map) is shown by
   viewers as its first, primary image, which is used.
3. **Orientation.** The EXIF ``Orientation`` tag (JPEG, PNG ``eXIf``, WebP, TIFF) is applied
   (``ImageOps.exif_transpose``), as viewers do. An unreadable EXIF block is ignored, as
   viewers ignore it.
4. **Samples → intensity in [0, 1]**, by Pillow mode:

   ================================  ======================================================
   mode                              decision
   ================================  ======================================================
   ``1``                             black 0, white 1 (a min-is-white TIFF, fax files
                                     among them, as its tag says: 0 white)
   ``L``, ``RGB``, ``RGBX``          sample / 255 (16-bit RGB and LA PNGs arrive as ``RGB``
                                     and ``LA``: Pillow keeps the high byte, within 1/255)
   ``I;16``, ``I;16B/L/N``           sample / 65535: 16-bit grey is scaled, never clamped
                                     (min-is-white TIFF: (65535 − sample) / 65535)
   ``P``                             the palette's colours (and alpha, see 6); a BMP's grey
                                     palette of 4- or 8-bit indices too, which Pillow reads
                                     as 1- or 8-bit samples
   ``CMYK``                          through the embedded ICC profile, else Pillow's naive
                                     CMYK → RGB (what a viewer without a profile shows)
   ``YCbCr``                         converted to RGB (full-range JPEG/JFIF matrix)
   ``HSV``                           converted to RGB (no file format holds it)
   ``LAB``                           CIE L*a*b* (D50) → sRGB through LittleCMS
   ``F`` (32-bit float)              taken as intensity: values in [0, 1], as in the JSON
                                     API (min-is-white TIFF: 1 − value); NaN, Inf or
                                     values outside [0, 1] are 422
   ``I`` (32-bit integer)            422: no agreed white level (save as 8 or 16 bits)
   ================================  ======================================================

   A TIFF's bits are read in its ``FillOrder`` (an uncompressed ``FillOrder`` 2 file
   too, which Pillow cannot read for palette or 8-bit min-is-white samples), as libtiff
   reads them; CCITT fax compression (Group 3 1-D and 2-D, Group 4, modified Huffman) is
   decoded by libtiff.

   A colour picture for a one-channel model becomes luma (ITU-R 601-2, Pillow's ``L``:
   exact for grey pixels); a grey picture for a three-channel model repeats its channel.
5. **Colour management.** An embedded ICC profile (``L``, ``RGB``, ``CMYK``, ``I;16``)
   converts the picture to sRGB (LittleCMS, perceptual intent), as colour-managed viewers
   show it; a profile LittleCMS cannot read is ignored. A PNG ``gAMA`` chunk without an
   ICC profile or ``sRGB`` chunk maps samples to display values
   ``v ** (1 / (2.2 · gamma))`` (PNG 2nd edition §13.13, display gamma 2.2); ``cHRM`` is
   ignored (it moves colours, not grey levels).
6. **Transparency.** Alpha (``LA``, ``RGBA``, ``PA``, premultiplied ``La``/``RGBa``, a
   palette's or a ``tRNS`` colour key in ``1``, ``L``, ``RGB``, ``P`` and ``I;16``) is
   composited onto the model's background: the colour that becomes 0 in the model input,
   black, or white when ``invert`` is set. A pixel under alpha 0 is background whatever
   colour it hides; partial alpha blends ``a · colour + (1 − a) · background``.
7. **Size.** Each channel is resized to the model's H×W in 32-bit float (bilinear, with
   Pillow's antialiasing when shrinking; the aspect ratio is not kept). A picture already
   H×W is not resampled, so a lossless file gives exactly its 8-bit twin's pixels.
8. **Invert** (optional): ``1 − intensity``, for a dark object on a light background.

Decoding is CPU work: callers run it off the event loop, and at most
:data:`DECODE_SLOTS` decodes run at once (each holds up to about 20 bytes per pixel of the
uploaded picture while it works: 320 MB at the default 4096 × 4096 limit).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image, ImageCms, ImageOps

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG opens MPO files too
FORMAT_NAMES = "PNG, JPEG, GIF, WebP, BMP or TIFF"
DECODE_SLOTS = max(2, os.cpu_count() or 1)  # decoding is CPU-bound: more gains nothing
_slots = threading.BoundedSemaphore(DECODE_SLOTS)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB", 5000))
_DISPLAY_GAMMA = 2.2


class ImageRejected(ValueError):
    """An upload that cannot become model input. ``status`` is the HTTP status that says why:
    400 (not an image the server reads, or corrupt), 413 (too many pixels) or 422 (an image
    the server reads but cannot turn into this model's input)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_image(
    data: bytes,
    shape: tuple[int, int, int],
    *,
    max_pixels: int,
    invert: bool = False,
) -> np.ndarray:
    """An uploaded image file → the model's input pixels, as a viewer displays the picture.

    Args:
        data: the file's bytes.
        shape: the model's input ``(C, H, W)``; ``C`` must be 1 or 3.
        max_pixels: the largest ``width × height`` accepted.
        invert: ``1 − intensity`` (a dark object on a light background); transparent pixels
            composite onto white instead of black, so they still become 0.

    Returns:
        float32 array ``(1, C, H, W)`` of intensities in [0, 1] (module docstring: how each
        mode, profile, alpha and orientation is treated).

    Raises:
        ImageRejected: 400 empty, not a readable format, corrupt, or incomplete (fewer
            pixels than the header declares); 413 over ``max_pixels``
            or a decompression bomb; 422 animated or multi-page, 32-bit integer pixels, float
            pixels outside [0, 1], or a model that does not take 1 or 3 channels.
    """
    c, h, w = shape
    if c not in (1, 3):
        raise ImageRejected(
            422, f"this model takes {c}-channel input; image uploads suit 1- or 3-channel models"
        )
    if not data:
        raise ImageRejected(400, "the uploaded file is empty")
    with _slots:
        return _decode(data, c, (h, w), max_pixels, invert)


def _decode(data: bytes, c: int, size: tuple[int, int], max_pixels: int, invert: bool):
    try:
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as e:
        raise ImageRejected(413, f"the uploaded image is too large ({e})") from None
    except Exception as e:  # Pillow raises many types for foreign bytes
        _refuse_chunk_bomb(e)
        _refuse_cut_short(data)
        raise ImageRejected(400, f"the uploaded file is not a {FORMAT_NAMES} image") from None
    fmt = img.format
    # Pillow reads 16-bit and float min-is-white TIFF samples as min-is-black (1-, 2-, 4- and
    # 8-bit ones it inverts itself): TIFF 6.0 §Section 3, PhotometricInterpretation 0.
    min_is_white = fmt == "TIFF" and img.tag_v2.get(262) == 0
    if img.width * img.height > max_pixels:
        raise ImageRejected(
            413, f"image of {img.width}×{img.height} pixels exceeds the limit of {max_pixels}"
        )
    try:
        if getattr(img, "is_animated", False) and fmt != "MPO":
            raise ImageRejected(
                422,
                f"the uploaded {fmt} image has {img.n_frames} frames (animated or multi-page); "
                "send a single picture",
            )
        # Before load: Pillow's own TIFF reader fills strips it cannot find with black.
        missing = _tiff_data_missing(img, data) if fmt == "TIFF" else None
        if missing is None:
            img = _read_as_stored(img, fmt, data)
            img.load()
            missing = _data_missing(img, data)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(413, f"the uploaded image is too large ({e})") from None
    except Exception as e:  # truncated or corrupt image data
        _refuse_chunk_bomb(e)
        if "truncated" in str(e) or "not enough image data" in str(e):
            missing = f"its pixel data ends before the picture does: {e}"
        else:
            _refuse_cut_short(data)  # e.g. an animated GIF cut in a later frame's header
            raise ImageRejected(
                400, f"the uploaded {fmt} image could not be decoded ({e})"
            ) from None
    if missing is not None:
        raise ImageRejected(400, f"the uploaded {fmt} image is incomplete ({missing})")
    # In place keeps format and info; a malformed EXIF block leaves the picture unturned, as
    # viewers leave it.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    try:
        bands, alpha = _intensities(img, c, min_is_white)
    except ImageRejected:
        raise
    except Exception as e:  # a mode or profile Pillow cannot convert
        raise ImageRejected(
            422, f"the uploaded {fmt} image ({img.mode}) cannot be converted ({e})"
        ) from None
    img.close()  # the bands hold what is needed: free the decoded picture
    # Background white under invert: a · colour + (1 − a), with (1 − a) made once.
    rest = 1.0 - alpha if invert and alpha is not None else None
    h, w = size
    out = np.empty((1, len(bands), h, w), dtype=np.float32)
    for i, make_band in enumerate(bands):
        band = make_band()  # one full-size float band at a time bounds the memory
        if alpha is not None:
            band *= alpha
            if rest is not None:
                band += rest
        if band.shape != (h, w):
            band = np.asarray(
                Image.fromarray(np.ascontiguousarray(band, dtype=np.float32)).resize(
                    (w, h), Image.Resampling.BILINEAR
                )
            )
        out[0, i] = band
    if c == 3 and len(bands) == 1:
        out = np.repeat(out, 3, axis=1)
    np.clip(out, 0.0, 1.0, out=out)
    if invert:
        out = 1.0 - out
    return out


def _refuse_chunk_bomb(e: Exception) -> None:
    """A compressed PNG text or ICC chunk (``zTXt``, ``iTXt``, ``iCCP``) that inflates past
    Pillow's ``PngImagePlugin.MAX_TEXT_CHUNK`` is a decompression bomb too: 413, as one in the
    pixels (Pillow says so only in a ``ValueError``'s text).

    Raises:
        ImageRejected: 413 when ``e`` is that refusal; otherwise returns.
    """
    if isinstance(e, ValueError) and "Decompressed data too large" in str(e):
        raise ImageRejected(
            413, f"the uploaded image holds metadata too large once decompressed ({e})"
        ) from None


# ---- a file whose own structure goes on past its end ----------------------------------------
#
# Pillow opens a GIF or BMP cut in its header or colour table, and any WebP cut short, as
# foreign bytes ("not a PNG, JPEG, ... image"), and an animated GIF cut in a later frame's
# header as "index out of range". These are read only once Pillow has refused a file: a file
# it decodes never reaches them, so they change a refusal's words, never whether it refuses.


def _refuse_cut_short(data: bytes) -> None:
    """Refuses, 400 "incomplete", a GIF, BMP or WebP (by its signature) whose own headers or
    block lengths go on past the file's last byte; otherwise returns.

    Raises:
        ImageRejected: 400 naming the format and where the file ends.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt, missing = "WEBP", _webp_cut_short(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        fmt, missing = "GIF", _gif_cut_short(data)
    elif data[:2] == b"BM":
        fmt, missing = "BMP", _bmp_cut_short(data)
    else:
        return
    if missing is not None:
        raise ImageRejected(400, f"the uploaded {fmt} image is incomplete ({missing})")


def _webp_cut_short(data: bytes) -> str | None:
    """A WebP shorter than its RIFF header's size, or one of whose chunks declares more bytes
    than follow it (RIFF: a chunk is a 4-byte kind, a little-endian 32-bit size, the data
    and a pad byte to an even length; WebP container specification, RFC 9649 §2.4)."""
    declared = struct.unpack_from("<I", data, 4)[0] + 8
    if len(data) < declared:
        return f"the file ends after {len(data)} of the {declared} bytes its RIFF header declares"
    pos = 12
    while pos < declared:
        if pos + 8 > declared:
            return f"it ends {declared - pos} bytes into a chunk's 8-byte header"
        kind, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if pos + 8 + size > declared:
            name = kind.decode("latin-1").strip()
            return f"its {name} chunk declares {size} bytes; the file holds {declared - pos - 8}"
        pos += 8 + size + (size & 1)
    return None


def _gif_cut_short(data: bytes) -> str | None:
    """A GIF that ends inside its header, a colour table, an extension or an image (its
    descriptor or its data sub-blocks) before the trailer (GIF89a specification §17-27).
    A byte where a block must start that starts none is corruption, not a cut: ``None``."""
    end = len(data)
    if end < 13:
        return f"the file ends after {end} bytes, inside its 13-byte header"
    pos = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
    frame = 0
    while True:
        if pos > end:
            return f"the file ends after {end} bytes, inside its global colour table"
        if pos == end:
            return None if frame else f"the file ends after {end} bytes, before any image"
        kind = data[pos]
        if kind == 0x3B:
            return None
        if kind == 0x2C:
            frame += 1
            if pos + 10 > end:
                return f"the file ends after {end} bytes, inside image {frame}'s descriptor"
            flags = data[pos + 9]
            pos += 10 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0) + 1  # + LZW code size
            what = f"image {frame}'s data"
        elif kind == 0x21:
            pos += 2
            what = "an extension block"
        else:
            return None
        while pos < end and data[pos]:
            pos += 1 + data[pos]
        if pos >= end:
            return f"the file ends after {end} bytes, inside {what}"
        pos += 1


def _bmp_cut_short(data: bytes) -> str | None:
    """A BMP that ends before its pixel data starts: inside its file header, its info header
    (its first 4 bytes give its size) or the colour table between them and the offset the
    file header gives the pixels (Microsoft BITMAPFILEHEADER, BITMAPINFOHEADER)."""
    end = len(data)
    if end < 18:
        return f"the file ends after {end} bytes, inside its headers"
    offset, header = struct.unpack_from("<I", data, 10)[0], struct.unpack_from("<I", data, 14)[0]
    if end < 14 + header:
        return f"the file ends after {end} bytes, inside its headers"
    if end < offset:
        return f"the file ends after {end} bytes, before its pixel data at byte {offset}"
    return None


# ---- pixel data the file does not hold -------------------------------------------------------
#
# Pillow (with ``ImageFile.LOAD_TRUNCATED_IMAGES`` False, as here) refuses a file that ends
# before its pixels do, but not every way a file can hold fewer pixels than its header
# declares: its PNG decoder stops without a word when the zlib stream ends on a row boundary,
# libjpeg turns a scan cut short by a marker into grey blocks (a warning Pillow discards), and
# its uncompressed-TIFF reader leaves strips it is not given black. Each check below returns
# what is missing, or ``None``, from the file's bytes: a pixel's value never proves it was
# decoded (a black row may be in the file), only, for PNG, that it was.

_INFLATE_PIECE = 1 << 20  # bytes of inflated PNG data held at once while counting them
# (column, row) start and step of the seven Adam7 passes (PNG 2nd edition §8.2).
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type (PNG 2nd edition §11.2.2)


def _data_missing(img: Image.Image, data: bytes) -> str | None:
    """What a loaded picture's file lacks of the pixel data its header declares, or ``None``."""
    if img.format == "PNG":
        # Pillow writes rows in order into a zeroed picture: a last row with a non-zero
        # byte was decoded, and so was every row before it.
        if not img.info.get("interlace") and img.crop((0, img.height - 1, *img.size)).getbbox():
            return None
        return _png_data_missing(data)
    if img.format in ("JPEG", "MPO"):
        return _jpeg_data_missing(data)
    return None


def _png_scanline_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines a PNG's inflated ``IDAT`` data holds: each row of each
    pass is one filter-type byte and ``ceil(columns × bits_per_pixel / 8)`` bytes; an empty
    Adam7 pass holds none (PNG 2nd edition §7.2, §8.2)."""
    total = 0
    for x0, y0, dx, dy in _ADAM7 if interlaced else ((0, 0, 1, 1),):
        cols, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if cols and rows:
            total += rows * (1 + (cols * bits_per_pixel + 7) // 8)
    return total


def _png_data_missing(data: bytes) -> str | None:
    """A PNG whose zlib stream ends before the scanlines its ``IHDR`` declares: Pillow's
    decoder stops at the stream's end and leaves the rows it did not get black. The ``IDAT``
    data is inflated again, ``_INFLATE_PIECE`` bytes at a time, and counted up to the
    declared length. The ``IHDR`` read is the last before the first ``IDAT``, as Pillow's."""
    header, expected, got, pos, view = None, None, 0, 8, memoryview(data)
    inflater = zlib.decompressobj()
    try:
        while pos + 8 <= len(data) and not inflater.eof:
            length, kind = struct.unpack_from(">I4s", data, pos)
            if kind == b"IEND":
                break
            if kind == b"IHDR" and expected is None and length >= 13:
                header = struct.unpack_from(">IIBBBBB", data, pos + 8)
            elif kind == b"IDAT":
                if expected is None:
                    if header is None or header[3] not in _PNG_CHANNELS:
                        return None
                    width, height, depth, colour, _, _, interlace = header
                    bits = depth * _PNG_CHANNELS[colour]
                    expected = _png_scanline_bytes(width, height, bits, interlace == 1)
                pending = view[pos + 8 : pos + 8 + length]
                while pending and got < expected and not inflater.eof:
                    got += len(inflater.decompress(pending, min(_INFLATE_PIECE, expected - got)))
                    pending = inflater.unconsumed_tail
                if got >= expected:
                    return None
            pos += 12 + length
    except zlib.error:
        return None  # Pillow read every row; a bad checksum after them is not a missing pixel
    if header is None or expected is None:
        return None
    width, height, _, _, _, _, interlace = header
    if interlace == 1:
        return f"its interlaced image data ends after {got} of its {expected} bytes"
    return f"its image data ends after {got // (expected // height)} of its {height} rows"


# The next marker after entropy-coded data: 0xFF 0x00 (a stuffed 0xFF), RSTn and fill bytes
# (0xFF 0xFF) are not markers (ITU-T T.81 §B.1.1.2, §B.1.1.5).
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_RST = re.compile(rb"\xff[\xd0-\xd7]")  # never inside entropy-coded data (stuffing)
_JPEG_NO_LENGTH = frozenset((0x01, 0xD8))  # TEM, SOI: markers without a segment
_JPEG_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn, not DHT/JPG/DAC
# libjpeg's warnings that the entropy-coded data stops short or is broken: it then decodes
# the rest of the segment as zero coefficients, flat grey blocks (jerror.h: JWRN_HIT_MARKER,
# JWRN_JPEG_EOF, JWRN_MUST_RESYNC, JWRN_HUFF_BAD_CODE, JWRN_ARITH_BAD_CODE,
# JWRN_BOGUS_PROGRESSION).
_JPEG_DATA_WARNINGS = (
    "premature end of data segment",
    "Premature end of JPEG file",
    "found marker",
    "bad Huffman code",
    "bad arithmetic code",
    "Inconsistent progression sequence",
)


def _jpeg_data_missing(data: bytes, *, whole_file: bool = True) -> str | None:
    """A JPEG (or an MPO's primary image) whose scans do not code every block: a scan cut
    short by a marker (an ``EOI`` inserted mid-scan, a resync that skips data), or
    progressive scans that stop before every coefficient of every component is coded.
    Pillow shows both, grey or blurred, without a word.

    The marker segments are walked (ITU-T T.81 Annex B) to find each scan's components,
    spectral band and successive-approximation bit; the entropy-coded data is then decoded
    by libjpeg-turbo (simplejpeg, at 1/8 scale: every coefficient is still read, few are
    transformed) with its warnings raised. ``APPn`` and ``COM`` segments are left out of
    that decode, so that a warning about metadata cannot hide one about the pixels.

    ``whole_file`` False: ``data`` is a JPEG-compressed TIFF strip, which libtiff decodes
    even without its ``EOI`` marker (a whole file without one, Pillow refuses)."""
    keep, frame, scans, sos, pos = [data[:2]], None, [], None, 2
    sof, interval, runs, scan_data = b"", 0, [], None  # runs: (ids, Ri, RSTn count) by scan
    while (m := _JPEG_MARKER.search(data, pos)) is not None:
        code, start, pos = data[m.start() + 1], m.start(), m.end()
        if scan_data is not None:  # the last scan's entropy-coded data ends at this marker
            runs[-1] = (*runs[-1][:2], len(_JPEG_RST.findall(data, scan_data, start)))
            scan_data = None
        if code == 0xD9:
            break
        if code in _JPEG_NO_LENGTH:
            continue
        if pos + 2 > len(data):
            return None
        end = pos + struct.unpack_from(">H", data, pos)[0]
        segment = data[pos + 2 : end]
        if code in _JPEG_FRAMES and len(segment) >= 6:
            frame = (code in _JPEG_PROGRESSIVE, segment[6 : 6 + 3 * segment[5] : 3])
            sof = segment
        elif code == 0xDD and len(segment) >= 2:
            interval = struct.unpack_from(">H", segment)[0]
        elif code == 0xDA and segment:
            n = segment[0]
            tail = segment[1 + 2 * n : 4 + 2 * n]
            if len(tail) == 3:
                scans.append(
                    (segment[1 : 1 + 2 * n : 2], tail[0], tail[1], tail[2] >> 4, tail[2] & 15)
                )
            sos = start if sos is None else sos
            runs.append((segment[1 : 1 + 2 * n : 2], interval, -1))
            scan_data = end
        if sos is None and not (0xE0 <= code <= 0xEF or code == 0xFE):
            keep.append(data[start:end])
        pos = end
    else:
        if whole_file:
            return None  # no EOI: Pillow has already refused the file
    if frame is None or not scans:
        return None
    uncoded = _jpeg_uncoded_components(*frame, scans)
    if uncoded:
        return f"its scans never code all of component {uncoded[0]}'s coefficients"
    stream = b"".join(keep) + data[sos : m.end() if m else len(data)]
    warning = _libjpeg_warning(stream, len(frame[1]))
    if warning is not None and "extraneous bytes before marker" in warning:
        return _jpeg_restarts_missing(sof, runs) or _jpeg_ends_early(stream, len(frame[1]))
    if warning is None:
        return None
    if any(w in warning for w in _JPEG_DATA_WARNINGS):
        return f"libjpeg: {warning}"
    # Anything else is a setting libjpeg-turbo refuses where Pillow decoded: its call.
    return None


# Two streams of made-up entropy-coded data (no 0xFF byte, so no marker): fed to libjpeg
# after a file's last byte, they change its picture only if it wanted more data.
_JPEG_PROBES = tuple(
    bytes(np.random.default_rng(seed).integers(0, 255, 256, dtype=np.uint8)) for seed in (1, 2)
)


def _jpeg_restarts_missing(sof: bytes, runs: list[tuple[bytes, int, int]]) -> str | None:
    """A scan with restart intervals that holds fewer RSTn markers than its MCUs need, or
    ``None``: a scan of M MCUs in intervals of Ri has ceil(M / Ri) − 1 of them (ITU-T T.81
    §B.2.1, §A.2: an interleaved scan's MCU covers Hmax × Vmax blocks' area, a
    one-component scan's one block of that component). A cut at an interval's end leaves
    no block half-coded for the probe of :func:`_jpeg_ends_early` to fill."""
    if len(sof) < 6 + 3 * sof[5]:
        return None
    height, width = struct.unpack_from(">HH", sof, 1)
    sampling = {sof[6 + 3 * i]: (sof[7 + 3 * i] >> 4, sof[7 + 3 * i] & 15) for i in range(sof[5])}
    if not sampling or min(min(hv) for hv in sampling.values()) < 1:
        return None
    hmax = max(h for h, _ in sampling.values())
    vmax = max(v for _, v in sampling.values())
    for i, (ids, interval, restarts) in enumerate(runs):
        if not interval or restarts < 0 or any(c not in sampling for c in ids):
            continue
        if len(ids) == 1:
            h, v = sampling[ids[0]]
            cols, rows = _ceil_div(width * h, hmax), _ceil_div(height * v, vmax)
            mcus = _ceil_div(cols, 8) * _ceil_div(rows, 8)
        else:
            mcus = _ceil_div(width, 8 * hmax) * _ceil_div(height, 8 * vmax)
        needed = _ceil_div(mcus, interval) - 1
        if restarts < needed:
            return f"scan {i} holds {restarts + 1} of its {needed + 1} restart intervals"
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_ends_early(stream: bytes, components: int) -> str | None:
    """What a JPEG ``stream`` with padding before a marker lacks, or ``None``.

    Padding between a scan's (or a restart interval's) last block and the next marker
    ("N extraneous bytes before marker 0xXX": webcams pad before RSTn, encoders before SOS
    or EOI) is not missing data: every block before it was decoded, and Pillow decodes the
    file whole. libjpeg, strict, stops at that warning (and may report it at a later marker
    than the padding's, its count summed over several), so what follows it, a scan cut
    short later in the file, is checked another way: the stream is decoded twice (not
    strict, padding skipped as Pillow skips it) with a different probe of made-up data
    before its final EOI. A stream that codes every block ignores the probe, as padding;
    one cut short decodes the probe as its missing blocks, and the two pictures differ."""
    body = stream[:-2] if stream.endswith(b"\xff\xd9") else stream
    pictures = []
    for probe in _JPEG_PROBES:
        try:
            pictures.append(
                simplejpeg.decode_jpeg(
                    body + probe + b"\xff\xd9",
                    colorspace="CMYK" if components == 4 else "RGB" if components > 1 else "GRAY",
                    strict=False,
                )
            )
        except ValueError:
            return None  # libjpeg-turbo refuses what Pillow decoded: its call
    if not np.array_equal(*pictures):
        return "its scan data stops before its last block, after padding before a marker"
    return None


def _libjpeg_warning(stream: bytes, components: int) -> str | None:
    """libjpeg-turbo's first warning (or error) decoding ``stream`` at 1/8 scale, or ``None``."""
    try:
        simplejpeg.decode_jpeg(
            stream, colorspace="CMYK" if components == 4 else "GRAY", min_factor=8, strict=True
        )
    except ValueError as e:
        return str(e)
    return None


def _jpeg_uncoded_components(
    progressive: bool, components: bytes, scans: list[tuple[bytes, int, int, int, int]]
) -> list[int]:
    """The frame's component ids whose 64 DCT coefficients are not all coded down to bit 0.

    A sequential scan codes all of its components' coefficients; a progressive scan codes
    coefficients ``Ss..Se`` from bit ``Al`` up (``Ah`` 0, the first scan of the band) or
    refines bit ``Al`` (ITU-T T.81 §G.1.1.1)."""
    lowest = np.full((256, 64), 99, dtype=np.int8)  # by component id; 99: never coded
    for ids, ss, se, _, al in scans:
        rows = np.frombuffer(ids, dtype=np.uint8)
        if progressive:
            lowest[rows, ss : se + 1] = np.minimum(lowest[rows, ss : se + 1], al)
        else:
            lowest[rows] = 0
    return [c for c in components if lowest[c].any()]


def _tiff_data_missing(img: Image.Image, data: bytes) -> str | None:
    """A TIFF whose strips or tiles do not hold every row its header declares: fewer
    offsets than the image needs, an offset of 0 (a "sparse" file), or, uncompressed, a
    strip whose byte count or the file's end leaves rows out (Pillow reads on past it into
    whatever follows, or leaves it black); JPEG-compressed strips are checked as JPEGs
    (libtiff, like Pillow, decodes a scan cut short as grey). Other compressions are
    libtiff's to refuse, and it does."""
    tags = img.tag_v2
    width, height = tags.get(256), tags.get(257)
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    planes = tags.get(277, 1) if tags.get(284, 1) == 2 else 1
    if 324 in tags:
        kind, offsets, counts = "tile", tags[324], tags.get(325, ())
        tile_w, tile_h = tags.get(322), tags.get(323)
    else:
        kind, offsets, counts = "strip", tags.get(273, ()), tags.get(279, ())
        tile_w, tile_h = width, tags.get(278, height)
    if not isinstance(tile_w, int) or not isinstance(tile_h, int) or tile_w <= 0 or tile_h <= 0:
        return None
    across, down = -(-width // tile_w), -(-height // tile_h)
    needed = across * down * planes
    if len(offsets) < needed:
        return f"it lists {len(offsets)} of the {needed} {kind}s its {width}×{height} pixels need"
    compression = tags.get(259, 1)
    bits = tags.get(258, (1,))
    bits = (bits,) if isinstance(bits, int) else tuple(bits)
    tables = tags.get(347, b"")
    for i in range(needed):
        offset = offsets[i]
        # No byte counts at all (a required tag, yet libtiff copes): the file's end decides.
        count = (counts[i] if i < len(counts) else 0) if counts else len(data)
        if offset == 0 or count == 0:
            return f"{kind} {i} is missing (offset {offset}, {count} bytes)"
        if compression == 1 and tags.get(262) != 6:  # uncompressed, not subsampled YCbCr
            plane, row = divmod(i, across * down)
            rows = tile_h if kind == "tile" else min(tile_h, height - (row // across) * tile_h)
            per_pixel = bits[plane] if planes > 1 and plane < len(bits) else sum(bits)
            need = rows * ((tile_w * per_pixel + 7) // 8)
            have = min(count, len(data) - offset)
            if have < need:
                return f"{kind} {i} holds {max(have, 0)} of the {need} bytes its rows need"
        elif compression == 7:
            chunk = data[offset : offset + count]
            stream = tables[:-2] + chunk[2:] if len(tables) > 4 else chunk
            missing = _jpeg_data_missing(stream, whole_file=False)
            if missing is not None:
                return f"{kind} {i}: {missing}"
    return None


# ---- samples Pillow would read other than as stored -------------------------------------------

_BMP_INDEX_RAWMODES = {1: "P;1", 4: "P;4", 8: "P"}  # bits per index → Pillow's raw mode
_REVERSED_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _read_as_stored(img: Image.Image, fmt: str, data: bytes) -> Image.Image:
    """The opened, not yet loaded ``img``, set to read its samples as the file stores them
    where Pillow's reader would not (its own picture, or a new one already decoded):

    * a BMP of 4- or 8-bit indices whose colour table is all grey (black and white for 2
      colours, index i grey i for more): Pillow drops the table and reads the indices as
      1-bit (``1``) or 8-bit (``L``) samples, so 8-bit indices 0 and 1 of a black and white
      drawing (as Pillow itself saves one) come out all black. It is decoded here as the
      palette picture it is (Microsoft BITMAPINFOHEADER: biBitCount, biClrUsed);
    * an uncompressed TIFF with ``FillOrder`` 2 (each byte's first pixel in its low bit):
      Pillow has no reader for 1-, 2- and 4-bit palette samples or 8-bit min-is-white ones
      so stored ("unknown raw mode"). The strips' bits are put in the usual order here and
      read as ``FillOrder`` 1, for every such file, as libtiff reads it (TIFF 6.0, FillOrder).

    Anything else is returned as it is.
    """
    if fmt == "BMP":
        return _bmp_palette_kept(img, data)
    if fmt == "TIFF" and img.tag_v2.get(266) == 2:
        _tiff_bits_in_order(img, data)
    return img


def _bmp_palette_kept(img: Image.Image, data: bytes) -> Image.Image:
    """``img`` (a BMP), or the same picture decoded as ``P`` when Pillow read its grey colour
    table's indices as samples of another width (see :func:`_read_as_stored`)."""
    tile = img.tile[0] if len(img.tile) == 1 else None
    if tile is None or tile.codec_name != "raw" or img.mode not in ("1", "L"):
        return img  # RLE data is read one index a byte, which Pillow gets right
    core = struct.unpack_from("<I", data, 14)[0] == 12  # OS/2 BITMAPCOREHEADER
    bits = struct.unpack_from("<H", data, 24 if core else 28)[0]
    if bits == (1 if img.mode == "1" else 8) or bits not in _BMP_INDEX_RAWMODES:
        return img
    colours = 0 if core else struct.unpack_from("<I", data, 46)[0]
    colours = colours or 1 << bits
    levels = [0, 255] if colours == 2 else list(range(min(colours, 256)))
    _, stride, direction = tile.args
    picture = Image.frombytes(
        "P",
        img.size,
        data[tile.offset :],
        "raw",
        (_BMP_INDEX_RAWMODES[bits], stride, direction),
    )
    picture.putpalette([v for level in levels for v in (level, level, level)])
    picture.info = dict(img.info)
    img.close()
    return picture


def _tiff_bits_in_order(img: Image.Image, data: bytes) -> None:
    """Reverse the bits of each byte of an uncompressed ``FillOrder`` 2 TIFF's strips or tiles
    and read them with Pillow's ``FillOrder`` 1 raw mode (``P;1R`` → ``P;1``); compressed
    files are libtiff's, which puts the bits in order itself."""
    if not img.tile or any(t.codec_name != "raw" or not t.args[0].endswith("R") for t in img.tile):
        return
    tags = img.tag_v2
    offsets, counts = (
        (tags.get(324, ()), tags.get(325, ()))
        if 324 in tags
        else (tags.get(273, ()), tags.get(279, ()))
    )
    stored = bytearray(data)
    for i, offset in enumerate(offsets):
        end = offset + counts[i] if i < len(counts) else len(data)
        stored[offset:end] = stored[offset:end].translate(_REVERSED_BITS)
    img.fp = io.BytesIO(bytes(stored))
    img.tile = [t._replace(args=(t.args[0][:-1], *t.args[1:])) for t in img.tile]


Band = Callable[[], np.ndarray]


def _intensities(
    img: Image.Image, c: int, min_is_white: bool = False
) -> tuple[list[Band], np.ndarray | None]:
    """A loaded picture → (colour bands, alpha): one band (grey) or three (RGB, only when
    ``c`` is 3), each made on demand as a fresh ``(height, width)`` float32 array in [0, 1];
    alpha the same, or ``None`` when the picture is opaque.

    ``min_is_white``: a TIFF whose ``PhotometricInterpretation`` is 0 (0 is white). Pillow
    inverts 1- to 8-bit samples of such a file itself; 16-bit and float ones it hands over as
    stored, and they are inverted here (``65535 − v``, ``1 − v``)."""
    mode = img.mode
    if mode == "I":
        raise ImageRejected(
            422,
            "32-bit integer pixels have no agreed white level; save the image with 8 or 16 "
            "bits per sample",
        )
    if mode == "F":
        arr = np.array(img, dtype=np.float32)  # a writable copy: compositing works in place
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageRejected(
                422, "a floating-point image must hold intensities in [0, 1] (no NaN or Inf)"
            )
        if min_is_white:
            np.subtract(1.0, arr, out=arr)
        return [lambda: arr], None
    if mode.startswith("I;16"):
        return _sixteen_bit(img, min_is_white)
    colour, alpha = _split_alpha(img)
    colour = _to_srgb(colour, None if mode == "LAB" else img.info.get("icc_profile"))
    colour = colour.convert("L" if c == 1 or colour.mode == "L" else "RGB")
    exponent = _png_gamma_exponent(img)
    bands = [functools.partial(_eight_bit, band, exponent) for band in colour.split()]
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.float32)
        alpha /= 255.0
    return bands, alpha


def _eight_bit(band: Image.Image, exponent: float | None) -> np.ndarray:
    """An 8-bit band → sample / 255 (float32: exactly the twin's value), then PNG gamma."""
    arr = np.asarray(band, dtype=np.float32)
    arr /= 255.0
    if exponent is not None:
        np.power(arr, exponent, out=arr)
    return arr


def _split_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """→ (colour in ``L``, ``RGB``, ``CMYK`` or a converted ``LAB``, alpha ``L`` or ``None``).

    Palettes, ``tRNS`` colour keys and premultiplied alpha become straight alpha here."""
    mode, keyed = img.mode, "transparency" in img.info
    if mode == "LAB":
        return ImageCms.applyTransform(img, _transform(_LAB.tobytes(), "LAB")), None
    if (mode in ("1", "L") and keyed) or mode == "La":
        img = img.convert("LA")
    elif (mode in ("RGB", "P") and keyed) or mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode in ("1", "P", "YCbCr", "HSV", "RGBX"):
        img = img.convert("L" if mode == "1" else "RGB")
    if img.mode in ("LA", "RGBA"):
        return img.convert(img.mode[:-1]), img.getchannel("A")
    return img, None


def _to_srgb(colour: Image.Image, icc: bytes | None) -> Image.Image:
    """``colour`` (``L``, ``RGB`` or ``CMYK``) through its ICC profile to sRGB; CMYK without a
    profile through Pillow's naive conversion. An unreadable profile is ignored."""
    if icc:
        try:
            return ImageCms.applyTransform(colour, _transform(icc, colour.mode))
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return colour.convert("RGB") if colour.mode == "CMYK" else colour


@functools.lru_cache(maxsize=32)
def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """A cached LittleCMS transform from the profile ``icc`` (or L*a*b* when ``mode`` is
    ``LAB``) in ``mode`` to sRGB ``RGB``; uploads from one camera or app share a profile."""
    src = _LAB if mode == "LAB" else ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(src, _SRGB, mode, "RGB")


def _sixteen_bit(
    img: Image.Image, min_is_white: bool = False
) -> tuple[list[Band], np.ndarray | None]:
    """16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) → sample / 65535 (``(65535 −
    sample) / 65535`` when ``min_is_white``: exactly its min-is-black twin's), through its
    ICC profile or PNG gamma; a ``tRNS`` grey key marks transparent pixels."""
    raw = np.asarray(img)
    arr = (65535 - raw.astype(np.int32) if min_is_white else raw).astype(np.float32)
    arr /= 65535.0
    icc = img.info.get("icc_profile")
    table = _grey_profile_table(icc) if icc else None
    if table is not None:
        # LittleCMS takes 8-bit grey: interpolate the profile's 256-entry tone curve.
        arr = np.interp(arr, np.linspace(0.0, 1.0, 256), table).astype(np.float32)
    else:
        exponent = _png_gamma_exponent(img)
        if exponent is not None:
            np.power(arr, exponent, out=arr)
    alpha = None
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha = (raw != key).astype(np.float32)
    return [lambda: arr], alpha


def _grey_profile_table(icc: bytes) -> np.ndarray | None:
    """The displayed (sRGB luma) value of each 8-bit grey level under ``icc``, or ``None``
    when LittleCMS cannot read it as a grey profile."""
    ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
    try:
        shown = ImageCms.applyTransform(ramp, _transform(icc, "L")).convert("L")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None
    return np.asarray(shown, dtype=np.float64)[0] / 255.0


def _png_gamma_exponent(img: Image.Image) -> float | None:
    """The exponent that maps a PNG's samples to display values under its ``gAMA`` chunk
    (PNG 2nd edition §13.13: ``display = sample ** (1 / (file_gamma · display_gamma))``),
    or ``None`` when there is none to apply: not a PNG, no ``gAMA``, an ICC profile or
    ``sRGB`` chunk (they take precedence, §11.3.3.3 and §11.3.3.5), or a gamma within 1%
    of the display's."""
    gamma = img.info.get("gamma")
    if (
        img.format != "PNG"
        or not isinstance(gamma, (int, float))
        or gamma <= 0
        or "icc_profile" in img.info
        or "srgb" in img.info
    ):
        return None
    exponent = 1.0 / (gamma * _DISPLAY_GAMMA)
    return None if abs(exponent - 1.0) < 0.01 else exponent
