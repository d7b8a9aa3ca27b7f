"""One image decoder for the pipeline and the server: bytes (a file or a `data:` URL) -> uint8
[image_size, image_size, 3], so a served image reaches the model as the same pixels it trained on.

Pillow decodes; EXIF orientation is applied; grayscale, CMYK and palette images become RGB, and
transparency is laid over white (what a viewer shows); the shorter side is resized to
`image_size` (bicubic) and the longer one center-cropped. An image that cannot become pixels
raises `BadImage` with one of REASONS and a sentence naming the fix.

A leaf module: Pillow and NumPy only.
"""

import base64
import binascii
import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REASONS = ("unreadable_image", "decompression_bomb", "zero_size", "image_not_found",
           "remote_url", "not_an_image_url")
# RFC 2397: its grammar's literals (`data:`, `;base64`) and the media type are case-insensitive.
DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*?;base64,(.*)",
                      re.DOTALL | re.IGNORECASE)
REMOTE_SCHEMES = ("http://", "https://")
OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
BACKGROUND = (255, 255, 255)


class BadImage(ValueError):
  """An image that cannot be decoded: `reason` (one of REASONS) and a sentence."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def is_data_url(source: str) -> bool:
  return source[:5].lower() == "data:"


def is_remote(source: str) -> bool:
  return source.lower().startswith(REMOTE_SCHEMES)


def data_url_bytes(url: str) -> bytes:
  """The bytes a base64 `data:` URL carries."""
  match = DATA_URL.fullmatch(url.strip())
  if match is None:
    raise BadImage("unreadable_image", "the data: URL is not `data:image/...;base64,...`; "
                   "encode the image as base64 with that prefix")
  try:
    return base64.b64decode(match.group(3), validate=True)
  except (binascii.Error, ValueError):
    raise BadImage("unreadable_image", "the data: URL's base64 does not decode; re-encode "
                   "the image") from None


def source_bytes(source: str, base_dir: Path | None = None) -> bytes:
  """The bytes of a local path (relative ones from `base_dir`) or a data: URL; remote URLs
  are never fetched here."""
  if not isinstance(source, str) or not source:
    raise BadImage("not_an_image_url", "an image must be a path or a data: URL string")
  if is_data_url(source):
    return data_url_bytes(source)
  if is_remote(source):
    raise BadImage("remote_url", f"{source[:80]} is a remote URL, which is not fetched; "
                   "download it and give its path")
  path = Path(source) if base_dir is None else base_dir / source
  try:
    return path.read_bytes()
  except OSError as e:
    raise BadImage("image_not_found", f"cannot read image file {path} ({e.strerror}); fix "
                   "the path (relative paths start at the input file's folder)") from None


def without_repr(error: Exception) -> str:
  """The error's text without the `<_io.BytesIO object at 0x...>` Pillow names its input by."""
  return OBJECT_REPR.sub("", str(error)).strip()


def open_checked(data: bytes, max_pixels: int | None) -> Image.Image:
  """The opened, fully loaded image; its size is checked before any pixel is decoded."""
  if not data:
    raise BadImage("zero_size", "the image is 0 bytes; drop it or give the right file")
  limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
      image = Image.open(io.BytesIO(data))
      width, height = image.size
      if width == 0 or height == 0:
        raise BadImage("zero_size", f"the image is {width}x{height} pixels; drop it")
      if limit is not None and width * height > limit:
        raise BadImage("decompression_bomb", f"the image is {width}x{height} pixels, over the "
                       f"limit of {limit}; shrink it or raise --max_image_pixels")
      image.load()
  except Image.DecompressionBombError as e:
    raise BadImage("decompression_bomb", f"{e}; shrink the image") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    if isinstance(e, BadImage):
      raise
    raise BadImage("unreadable_image", f"Pillow cannot decode the image ({without_repr(e)}); "
                   "the file is truncated, corrupt or not an image") from None
  return image


def to_rgb(image: Image.Image) -> Image.Image:
  """Any mode -> RGB; transparent pixels are laid over white."""
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def resize_and_crop(image: Image.Image, image_size: int) -> Image.Image:
  """The shorter side resized to image_size (aspect kept), the longer one cropped centrally."""
  width, height = image.size
  scale = image_size / min(width, height)
  size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
  if size != image.size:
    image = image.resize(size, Image.Resampling.BICUBIC)
  left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
  return image.crop((left, top, left + image_size, top + image_size))


def array_image(array, image_size: int, max_pixels: int | None = None) -> np.ndarray:
  """An already decoded uint8 image (TFDS's image features: [H, W] or [H, W, 1|3|4]) ->
  uint8 [image_size, image_size, 3], converted, resized and cropped as `decode_image` does."""
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3
                                                         and array.shape[-1] in (3, 4))):
    raise BadImage("unreadable_image", f"an image array must be uint8 [H, W] or [H, W, 1|3|4], "
                   f"not {array.dtype} {list(array.shape)}; decode it to pixels first")
  height, width = array.shape[:2]
  if width == 0 or height == 0:
    raise BadImage("zero_size", f"the image is {width}x{height} pixels; drop it")
  limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  if limit is not None and width * height > limit:
    raise BadImage("decompression_bomb", f"the image is {width}x{height} pixels, over the "
                   f"limit of {limit}; shrink it or raise --max_image_pixels")
  return np.asarray(resize_and_crop(to_rgb(Image.fromarray(array)), image_size), np.uint8)


def decode_image(data: bytes, image_size: int, max_pixels: int | None = None) -> np.ndarray:
  """Encoded image bytes -> uint8 [image_size, image_size, 3]. `max_pixels`: the largest
  width * height accepted (default Pillow's MAX_IMAGE_PIXELS)."""
  image = open_checked(data, max_pixels)
  try:
    image = ImageOps.exif_transpose(image)
  except (OSError, SyntaxError, ValueError) as e:  # a malformed EXIF block
    raise BadImage("unreadable_image", f"the image's EXIF data is malformed ({e}); strip "
                   "it") from None
  return np.asarray(resize_and_crop(to_rgb(image), image_size), np.uint8)
