"""A row's stored image: where it is, its header read cheaply, its pixels decoded on demand.

A stored image is a path (relative to the data file's directory, or absolute), raw bytes, a
``data:image/...;base64,`` URI, or a Hugging Face style dict ``{"bytes": ..., "path": ...}``
whose bytes are raw (parquet, arrow) or base64 text (JSONL). ``ImageRef.header`` opens it
with PIL, which reads the format and size from the first bytes and decodes nothing (a few
tens of microseconds); ``ImageRef.decode`` decodes the pixels to RGB, when a step needs them.
A file damaged past its header (e.g. a truncated JPEG) passes the first and fails the second.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, TypeVar

from PIL import Image, UnidentifiedImageError

from .errors import BadImage, BadRow, FieldError, describe

T = TypeVar("T")


@dataclass(frozen=True)
class ImageRef:
    """The image of row ``row`` of ``file``, as stored (``value``; paths relative to ``base_dir``)."""

    value: Any
    base_dir: Path
    file: str
    row: int

    def header(self) -> tuple[str, tuple[int, int]]:
        """``(format, (width, height))`` from the header, without decoding; FieldError if unreadable."""
        return _with_image(self.value, self.base_dir, lambda image: (image.format, image.size))

    def decode(self) -> Image.Image:
        """The RGB pixels; BadImage (file, row and field named) if they cannot be decoded."""
        try:
            return _with_image(self.value, self.base_dir, _pixels)
        except FieldError as e:
            raise BadImage(BadRow(self.file, self.row, "image", e.reason)) from e.__cause__


def _pixels(image: Image.Image) -> Image.Image:
    image.load()
    return image.convert("RGB")


def _with_image(value: Any, base_dir: Path, use: Callable[[Image.Image], T]) -> T:
    """``use`` the PIL image opened (lazily: header only) on the stored ``value``; PIL's many
    exceptions for undecodable data become one FieldError naming what was read."""
    stream, what = _open(value, base_dir)
    try:
        with stream, Image.open(stream) as image:
            return use(image)
    except UnidentifiedImageError as e:
        raise FieldError("image", f"cannot decode {what}: unrecognised image format") from e
    except Exception as e:  # PIL reports corrupt data with many exception types
        raise FieldError("image", f"cannot decode {what}: {e}") from e


def _open(value: Any, base_dir: Path) -> tuple[IO[bytes], str]:
    """A binary stream over the encoded image and a description of it for errors."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            data = value["bytes"]
            return io.BytesIO(_b64decode(data) if isinstance(data, str) else data), "embedded bytes"
        if value.get("path") is not None:
            return _open(value["path"], base_dir)
        raise FieldError("image", "dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value)), "embedded bytes"
    if isinstance(value, str) and value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise FieldError("image", f"unsupported data URI {header!r} (only base64 is supported)")
        return io.BytesIO(_b64decode(payload)), "data URI"
    if isinstance(value, str):
        try:
            return (base_dir / value).open("rb"), repr(value)  # an absolute ``value`` replaces base_dir
        except FileNotFoundError:
            raise FieldError("image", f"cannot open {value!r}: file not found") from None
        except OSError as e:
            raise FieldError("image", f"cannot open {value!r}: {e.strerror or e}") from e
    raise FieldError("image", f"expected a path, bytes, a data URI or a {{'bytes', 'path'}} dict, got {describe(value)}")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise FieldError("image", f"invalid base64: {e}") from e
