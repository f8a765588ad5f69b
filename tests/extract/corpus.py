"""Bad and awkward media made on the fly for the decode and source tests: images, PNG chunks, videos, photos."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import skimage.data
import sklearn.datasets
from PIL import Image

SKIMAGE = Path(skimage.data.__file__).parent
SKLEARN_IMAGES = Path(sklearn.datasets.__file__).parent / "images"
PHOTOS = (SKIMAGE / "astronaut.png", SKIMAGE / "coffee.png", SKIMAGE / "chelsea.png", SKIMAGE / "rocket.jpg")
PHOTOS += (SKLEARN_IMAGES / "china.jpg", SKLEARN_IMAGES / "flower.jpg")
FRAME_STEP = 8  # video frame i is filled with gray level FRAME_STEP * i, so a decoded frame tells its index


def photo(k: int, long_side: int = 64) -> np.ndarray:
    """A real photo (RGB uint8), resized so its long side is ``long_side`` (aspect ratios differ between k)."""
    im = Image.open(PHOTOS[k % len(PHOTOS)]).convert("RGB")
    scale = long_side / max(im.size)
    return np.array(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR))


def encode(image: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one) of (H, W, 3) uint16 values."""
    h, w, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def corrupt_crc(png: bytes, chunk: bytes) -> bytes:
    """The PNG with the CRC of its first ``chunk`` (e.g. b"IDAT") flipped; the data is left intact."""
    at = png.index(chunk)
    length = struct.unpack(">I", png[at - 4 : at])[0]
    crc = at + 4 + length
    return png[:crc] + bytes(b ^ 0xFF for b in png[crc : crc + 4]) + png[crc + 4 :]


def with_exif_orientation(image: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def animated_gif(colors: tuple[tuple[int, int, int], ...], size: int = 8) -> bytes:
    frames = [Image.new("RGB", (size, size), c) for c in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def video(path: Path, n: int = 30, size: int = 64, fps: int = 10, codec: str = "mpeg4", intra_only: bool = False) -> Path:
    """A clip of ``n`` frames: frame i is gray level FRAME_STEP * i with a white square moving left to right.

    MP4s get their index first (``faststart``), so that a truncated one still opens, as streamed files do.
    """
    options = {"movflags": "+faststart"} if path.suffix == ".mp4" else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        if intra_only:
            stream.codec_context.gop_size = 1
        for i in range(n):
            a = np.full((size, size, 3), FRAME_STEP * i % 256, np.uint8)
            x = (2 * i) % (size - 8)
            a[size - 8 :, x : x + 8] = 255
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def frame_ids(frames: np.ndarray) -> list[int]:
    """The index each decoded test-video frame shows (its gray level, away from the moving square)."""
    return [round(float(f[: f.shape[0] // 2].mean()) / FRAME_STEP) for f in frames]
