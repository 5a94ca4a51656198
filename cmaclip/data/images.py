"""Decode stored image bytes into RGB pictures, refusing anything that could stall a worker.

Both the shard builders and the training pipeline call :func:`decode_image`, so a picture that
builds into a shard also decodes during training, and both fail on bad input in the same way.
"""

from __future__ import annotations

import io
import logging

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
MAX_ASPECT = 20.0  # wider or taller images would be resized to a huge long side before cropping

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# PNG, JPEG and GIF: bytes that start like a picture but do not open were cut short or damaged
_KNOWN_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


class ImageDecodeError(ValueError):
    """Raised when bytes cannot become an RGB picture; the message says why."""


class ImageTooLargeError(ImageDecodeError):
    """Raised when an image's header claims more pixels than allowed (a decompression bomb)."""


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float = MAX_ASPECT
) -> Image.Image:
    """Decode PNG, JPEG or any format PIL reads into a fully loaded RGB picture.

    Transparency is composited on white, because the encoders were trained on opaque pictures
    and a black background (what a plain ``convert("RGB")`` gives) changes what they see.
    Animated pictures give their first frame. 16-bit pictures are scaled down to 8 bits rather
    than clipped.

    The size in the header is checked against ``max_pixels`` before any pixel is decoded, so a
    small file that claims to be enormous is refused at once. PIL's own process-wide limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) is left alone; it still applies as an upper bound. A picture
    more than ``max_aspect`` times wider than tall (or taller than wide) is refused too: the
    encoders' resize would blow its long side up to thousands of pixels before cropping.

    Example:
        >>> clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
        >>> decode_image(encode_png(clear)).getpixel((0, 0))
        (255, 255, 255)

    Raises:
        ImageDecodeError: for empty bytes, bytes that are no picture, a truncated or corrupt
            file, a header that claims more than ``max_pixels`` pixels, or a picture of an
            aspect ratio beyond ``max_aspect``.
    """
    if not data:
        raise ImageDecodeError("empty image bytes")

    # read the header only: PIL decodes pixels lazily, on load()
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        if data.startswith(_KNOWN_SIGNATURES):
            raise ImageDecodeError("truncated or corrupt image header") from error
        raise ImageDecodeError("bytes are not a recognised image format") from error
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"image header claims too many pixels: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"unreadable image header: {error}") from error

    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image header claims {width}x{height} = {width * height} pixels, "
            f"more than max_pixels={max_pixels}"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageDecodeError(f"aspect ratio of {width}x{height} exceeds {max_aspect:g}:1")

    # PIL plugins report corrupt or truncated data with many exception types, so any failure
    # while decoding pixels is treated as a bad file rather than a bug in the caller
    try:
        image.load()
    except Exception as error:
        raise ImageDecodeError(f"truncated or corrupt {image.format} data: {error}") from error

    try:
        return _to_rgb(image)
    except (OSError, ValueError) as error:
        raise ImageDecodeError(f"cannot convert {image.mode} pixels to RGB: {error}") from error


def encode_png(image: Image.Image) -> bytes:
    """Encode a picture as PNG bytes, the lossless format the shards store after any resize."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image

    # 16- and 32-bit grayscale: PIL clips to 255 when converting, so scale to 8 bits first
    if mode.startswith("I;16") or mode == "I":
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
        mode = "L"

    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")

    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
