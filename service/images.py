"""Uploaded image files → model input pixels, as an image viewer shows them.

A file's samples are not always the picture a viewer displays: a 16-bit sample of 65535 is
white, a pixel under alpha 0 is not seen whatever colour it hides, an EXIF ``Orientation``
tag turns the picture, an ICC profile or PNG ``gAMA`` chunk changes the displayed tone. The
model must see the displayed picture, so that two files that look the same get the same
answer. :func:`decode_image` decodes with Pillow and applies, in this order:

1. **Format.** PNG, JPEG (MPO included), GIF, WebP, BMP and TIFF; anything else is 400.
   Width × height over the server's ``max_image_pixels`` (or over Pillow's decompression-bomb
   limit) is 413, decided from the header before any pixel is decoded; so is a PNG text or
   ICC chunk that inflates past Pillow's ``MAX_TEXT_CHUNK``.
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
   ``1``                             black 0, white 1
   ``L``, ``RGB``, ``RGBX``          sample / 255 (16-bit RGB and LA PNGs arrive as ``RGB``
                                     and ``LA``: Pillow keeps the high byte, within 1/255)
   ``I;16``, ``I;16B/L/N``           sample / 65535: 16-bit grey is scaled, never clamped
   ``P``                             the palette's colours (and alpha, see 6)
   ``CMYK``                          through the embedded ICC profile, else Pillow's naive
                                     CMYK → RGB (what a viewer without a profile shows)
   ``YCbCr``                         converted to RGB (full-range JPEG/JFIF matrix)
   ``HSV``                           converted to RGB (no file format holds it)
   ``LAB``                           CIE L*a*b* (D50) → sRGB through LittleCMS
   ``F`` (32-bit float)              taken as intensity: values in [0, 1], as in the JSON
                                     API; NaN, Inf or values outside [0, 1] are 422
   ``I`` (32-bit integer)            422: no agreed white level (save as 8 or 16 bits)
   ================================  ======================================================

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
import threading
from collections.abc import Callable

import numpy as np
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
        ImageRejected: 400 empty, not a readable format or corrupt; 413 over ``max_pixels``
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
        raise ImageRejected(400, f"the uploaded file is not a {FORMAT_NAMES} image") from None
    fmt = img.format
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
        img.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(413, f"the uploaded image is too large ({e})") from None
    except Exception as e:  # truncated or corrupt image data
        _refuse_chunk_bomb(e)
        raise ImageRejected(400, f"the uploaded {fmt} image could not be decoded ({e})") from None
    # In place keeps format and info; a malformed EXIF block leaves the picture unturned, as
    # viewers leave it.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    try:
        bands, alpha = _intensities(img, c)
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


Band = Callable[[], np.ndarray]


def _intensities(img: Image.Image, c: int) -> tuple[list[Band], np.ndarray | None]:
    """A loaded picture → (colour bands, alpha): one band (grey) or three (RGB, only when
    ``c`` is 3), each made on demand as a fresh ``(height, width)`` float32 array in [0, 1];
    alpha the same, or ``None`` when the picture is opaque."""
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
        return [lambda: arr], None
    if mode.startswith("I;16"):
        return _sixteen_bit(img)
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


def _sixteen_bit(img: Image.Image) -> tuple[list[Band], np.ndarray | None]:
    """16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) → sample / 65535, through its
    ICC profile or PNG gamma; a ``tRNS`` grey key marks transparent pixels."""
    raw = np.asarray(img)
    arr = raw.astype(np.float32)
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
