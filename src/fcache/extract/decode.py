"""Decoding untrusted media for extraction: images with Pillow, video with PyAV; every failure a ``SampleError``.

Nothing here crashes a run: a bad file becomes a ``Status`` (fcache.spec) and a message naming the file.

Images (``decode_image``, ``decode_image_bytes``):
  - empty -> EMPTY_FILE; cut short -> TRUNCATED (Pillow's "image file is truncated"; ``ImageFile.LOAD_TRUNCATED_IMAGES``
    is never touched); not an image, or a file cut inside its header (it cannot be told from garbage) -> DECODE_ERROR.
  - PNGs are checked with ``Image.verify()`` first, which checks the CRC of every chunk: a bad CRC -> DECODE_ERROR,
    a PNG missing its end -> TRUNCATED (Pillow alone ignores the CRC of IDAT chunks).
  - more than ``max_pixels`` pixels -> TOO_LARGE. Pillow's DecompressionBombWarning is made an error, so the effective
    limit is ``min(max_pixels, PIL.Image.MAX_IMAGE_PIXELS)``; raise the latter process-wide to allow larger images.
    (``warnings.catch_warnings`` is process-wide: threads decoding at once may briefly miss that filter, but the
    ``max_pixels`` check does not depend on it.)
  - only JPEG/PNG/GIF/BMP/WEBP/TIFF/MPO/PPM are opened: no exotic Pillow plugin (EPS runs Ghostscript) sees user files.
  - output is RGB uint8 (H, W, 3): CMYK via Pillow; 16-bit images scaled by their high byte (``v >> 8``: 65535 -> 255,
    as Pillow does for 16-bit RGB PNGs), never clipped (32-bit integer images are first clipped to 0..65535); alpha
    and palette transparency composited onto black (``rgb * alpha / 255``); animated images give their first frame;
    float images are taken as [0, 1] when their maximum is at most 1, else as [0, 255].
  - EXIF orientation (1..8) is applied with Pillow's transposes and returned, so the store records it.

Video (``decode_video``): ``clips`` clips of ``frames`` frames sampled uniformly (``clip_indices``); see its docstring
for the statuses (TIMEOUT, VIDEO_PARTIAL, TRUNCATED, DECODE_ERROR, EMPTY_FILE, TOO_LARGE).

Paths named by data files are checked with ``inside_root``: one that escapes ``--root`` -> OUTSIDE_ROOT. The check is
lexical (``..`` and absolute paths); symlinks that the owner of ``--root`` placed inside it are followed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image

from fcache.common.deadline import DeadlineExceeded, deadline
from fcache.spec import Status

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default MAX_IMAGE_PIXELS (~ 9459 x 9459)
DEFAULT_MAX_FRAMES = 100_000  # ~55 minutes at 30 fps
MAX_FILE_BYTES = 1 << 30  # an image file is read into memory whole: a larger one is TOO_LARGE
DEFAULT_TIMEOUT_S = 60.0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # matched case-insensitively
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".ogv", ".wmv", ".3gp")
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO", "PPM")
# FFmpeg demuxers a video may use: no playlists (hls, concat) that open further files or URLs.
VIDEO_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,m4v"
EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class SampleError(Exception):
    """One sample cannot be used; ``status`` is what the store records for it."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Decoded:
    """A decoded sample: RGB uint8 pixels (EXIF orientation applied) and what decoding learned."""

    image: np.ndarray | None = None  # (H, W, 3) uint8, images
    frames: np.ndarray | None = None  # (clips * T, H, W, 3) uint8, video: clip c is frames[c*T:(c+1)*T]
    times: np.ndarray | None = None  # (clips * T,) float seconds of each sampled frame, video
    orientation: int = 1  # EXIF orientation that was applied
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # worker-written targets of this sample
    status: Status = Status.OK  # OK, or VIDEO_PARTIAL for a video that decoded only in part
    message: str = ""


# -- paths ----------------------------------------------------------------------------------------------------


def inside_root(root: str | Path, name: str | Path) -> Path:
    """``root / name`` normalised; SampleError(OUTSIDE_ROOT) when it escapes ``root`` (``..`` or an absolute path)."""
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, os.fspath(name)))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise SampleError(Status.OUTSIDE_ROOT, f"{name}: the path escapes --root {base}; it was refused (fix the path in the data file)")
    return Path(full)


def read_media(path: str | Path, *, root: str | Path | None = None) -> bytes:
    """All bytes of a media file. OUTSIDE_ROOT (when ``root`` is given), EMPTY_FILE, TOO_LARGE (> MAX_FILE_BYTES), or
    DECODE_ERROR when unreadable."""
    p = inside_root(root, path) if root is not None else Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SampleError(Status.DECODE_ERROR, f"{p}: cannot read the file ({e.strerror or e})") from None
    if not data:
        raise SampleError(Status.EMPTY_FILE, f"{p}: the file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise SampleError(Status.TOO_LARGE, f"{p}: the file has more than {MAX_FILE_BYTES} bytes")
    return data


# -- images ---------------------------------------------------------------------------------------------------


@functools.cache
def opened_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS this Pillow registers (Pillow 13 opens MPO through its JPEG plugin and registers no MPO)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def decode_image(path: str | Path, *, root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode an image file to RGB uint8 (H, W, 3) with its EXIF orientation applied (see the module docstring)."""
    return decode_image_bytes(read_media(path, root=root), name=str(path), max_pixels=max_pixels)


def decode_image_bytes(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Like ``decode_image`` for bytes already in memory (tar members); ``name`` is used in messages."""
    im, orientation = load_image_bytes(data, name=name, max_pixels=max_pixels)
    return Decoded(image=to_rgb(im, orientation, name=name), orientation=orientation)


def load_image(path: str | Path, *, root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, int]:
    """Open, check and load an image file; its EXIF orientation is read, not applied. Raises SampleError."""
    return load_image_bytes(read_media(path, root=root), name=str(path), max_pixels=max_pixels)


def load_image_bytes(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, int]:
    """Open, check and load image bytes: (the Pillow image, its EXIF orientation 1..8). Raises SampleError."""
    if not data:
        raise SampleError(Status.EMPTY_FILE, f"{name}: the file is empty (0 bytes)")
    with _image_errors(name), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data), formats=opened_formats())
        w, h = im.size
        if w * h > max_pixels:
            raise SampleError(Status.TOO_LARGE, f"{name}: {w}x{h} = {w * h} pixels is more than the limit of {max_pixels}")
        if w < 1 or h < 1:
            raise SampleError(Status.DECODE_ERROR, f"{name}: the image has no pixels ({w}x{h})")
        if im.format == "PNG":
            im.verify()  # checks every chunk's CRC; the image must be reopened afterwards
            im = Image.open(io.BytesIO(data), formats=("PNG",))
        im.load()
    return im, exif_orientation(im)


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1..8); 1 when absent, malformed or out of range."""
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not cost a decodable image
        return 1
    return value if value in ORIENTATION_TRANSPOSE else 1


def orient(im: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation (1..8) to an image (or a label map) with Pillow's transposes."""
    method = ORIENTATION_TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


def oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(w, h) of an image of ``size`` once ``orientation`` is applied (5..8 swap the axes)."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def to_rgb(im: Image.Image, orientation: int = 1, *, name: str = "image") -> np.ndarray:
    """RGB uint8 (H, W, 3) of a loaded Pillow image, after applying ``orientation`` (see the module docstring)."""
    with _image_errors(name):
        rgb = _rgb_array(orient(im, orientation))
    return rgb


def _rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT_MODES:
        g = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.stack([g, g, g], axis=-1))
    if im.mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float32))
        g = np.clip(np.rint(v * (255.0 if v.max(initial=0) <= 1 else 1.0)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.stack([g, g, g], axis=-1))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)  # composited onto black
    return np.ascontiguousarray(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))  # convert would copy an RGB image


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Turn Pillow's exceptions into SampleErrors with the matching status."""
    try:
        yield
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError(Status.TOO_LARGE, f"{name}: refused as a decompression bomb ({e})") from None
    except MemoryError:
        raise SampleError(Status.TOO_LARGE, f"{name}: not enough memory to decode the image") from None
    except Image.UnidentifiedImageError:
        formats = "/".join(IMAGE_FORMATS)
        raise SampleError(Status.DECODE_ERROR, f"{name}: not a readable image ({formats}), or cut inside its header") from None
    except Exception as e:
        status = Status.TRUNCATED if isinstance(e, EOFError) or "truncated" in str(e).lower() else Status.DECODE_ERROR
        what = "the file is truncated" if status == Status.TRUNCATED else "the image is corrupt"
        raise SampleError(status, f"{name}: {what} ({type(e).__name__}: {e})") from None


# -- video ----------------------------------------------------------------------------------------------------


def clip_indices(n: int, frames: int, clips: int) -> np.ndarray:
    """Frame indices (clips * frames,) sampled uniformly from a video of ``n`` frames.

    Clip c covers the c-th of ``clips`` equal segments [c n / clips, (c+1) n / clips); its T = ``frames`` indices are
    the centres of T equal parts of that segment, rounded down. A video shorter than a clip repeats frames.
    """
    if n < 1 or frames < 1 or clips < 1:
        raise ValueError(f"clip_indices needs n, frames, clips >= 1 (got {n}, {frames}, {clips})")
    c = np.arange(clips, dtype=np.int64)[:, None]
    t = np.arange(frames, dtype=np.int64)[None, :]
    idx = (n * (2 * c * frames + 2 * t + 1)) // (2 * clips * frames)  # exact floor of (c + (t + 0.5) / T) * n / clips
    return np.minimum(idx, n - 1).reshape(-1)


def decode_video(
    path: str | Path,
    *,
    frames: int,
    clips: int = 1,
    root: str | Path | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Decoded:
    """Decode ``clips`` clips of ``frames`` frames: ``Decoded.frames`` (clips * T, H, W, 3) uint8 and ``times``.

    ``times`` are presentation times in seconds from the start of the stream. Frames are decoded in order up to the
    last one needed, and only the sampled ones are kept. Statuses:
      - EMPTY_FILE: 0 bytes. DECODE_ERROR: no readable container (or a demuxer outside ``VIDEO_FORMATS``), no video
        stream, or no frame at all. TOO_LARGE: frames of more than ``max_pixels`` pixels.
      - TIMEOUT: more than ``max_frames`` frames, or decoding took longer than ``timeout_s`` (SIGALRM when called on the
        main thread with no other alarm pending; elsewhere the deadline is checked between frames, so a single frame
        that hangs inside FFmpeg is not interrupted there).
      - the video ends early (the decoder fails, the demuxer marks a packet as cut short, or fewer frames decode than
        the header's frame count announces, by more than max(2, 2%), or than duration x frame rate, by more than
        10% + 2): VIDEO_PARTIAL with the clips sampled uniformly from the whole frames that did decode, when there
        are at least ``frames`` of them (one clip's worth); else TRUNCATED. A shortfall within those margins is OK.
    """
    p = inside_root(root, path) if root is not None else Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise SampleError(Status.DECODE_ERROR, f"{p}: cannot read the file ({e.strerror or e})") from None
    if size == 0:
        raise SampleError(Status.EMPTY_FILE, f"{p}: the file is empty (0 bytes)")
    try:
        with deadline(timeout_s) as check:
            return _decode_video(p, frames, clips, max_frames, max_pixels, check)
    except DeadlineExceeded:
        raise SampleError(Status.TIMEOUT, f"{p}: decoding took longer than {timeout_s:g}s; the file may be malformed") from None


@dataclass
class _Probe:
    n: int  # frames to plan with: the header's count, else packets counted by demuxing
    expected: float  # frames the duration announces (0 when unknown)
    fps: float


@dataclass
class _Grab:
    kept: dict[int, tuple[np.ndarray, float]] = field(default_factory=dict)  # index -> (H, W, 3) frame, time
    decoded: int = 0
    error: str = ""


def _open(path: Path) -> av.container.InputContainer:
    options = {"format_whitelist": VIDEO_FORMATS, "protocol_whitelist": "file"}
    try:
        return av.open(str(path), mode="r", options=options)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise SampleError(
            Status.DECODE_ERROR, f"{path}: not a readable video container: corrupt, cut before its index, or not a video ({e})"
        ) from None


def _decode_video(path: Path, frames: int, clips: int, max_frames: int, max_pixels: int, check: Callable[[], None]) -> Decoded:
    probe = _probe(path, max_frames, max_pixels, check)
    want = clip_indices(max(probe.n, 1), frames, clips)
    grab = _grab(path, want, probe.fps, check)
    short = grab.decoded <= int(want.max())  # the video ended before the last frame the plan needs
    truncated = bool(grab.error) or (probe.expected > 0 and probe.n < 0.9 * probe.expected - 2)
    truncated = truncated or (short and probe.n - grab.decoded > max(2, probe.n // 50))
    available = grab.decoded if short else max(probe.n, grab.decoded)
    why = _why(grab, probe)
    if available == 0:
        status = Status.TRUNCATED if truncated else Status.DECODE_ERROR
        raise SampleError(status, f"{path}: no video frame could be decoded{why}")
    if truncated and available < frames:
        raise SampleError(Status.TRUNCATED, f"{path}: only {available} frame(s) decode, fewer than one clip of {frames}{why}")
    if short:
        want = clip_indices(available, frames, clips)
        grab = _grab(path, want, probe.fps, check)
        if grab.decoded <= int(want.max()):
            raise SampleError(Status.DECODE_ERROR, f"{path}: decoding is not repeatable ({grab.decoded} frames on a second pass)")
    out = np.stack([grab.kept[int(i)][0] for i in want])  # (clips * T, H, W, 3)
    times = np.array([grab.kept[int(i)][1] for i in want], dtype=np.float64)
    if not truncated:
        return Decoded(frames=out, times=times)
    message = f"{path}: the video decodes only in part, clips were sampled from its first {available} frames{why}"
    return Decoded(frames=out, times=times, status=Status.VIDEO_PARTIAL, message=message)


def _why(grab: _Grab, probe: _Probe) -> str:
    parts = [f"{max(probe.n, round(probe.expected))} announced"]
    parts += [grab.error] if grab.error else []
    return f" ({'; '.join(parts)})"


def _probe(path: Path, max_frames: int, max_pixels: int, check: Callable[[], None]) -> _Probe:
    """Frame count to plan with, checked against the caps, without decoding any frame."""
    with _open(path) as container:
        if not container.streams.video:
            raise SampleError(Status.DECODE_ERROR, f"{path}: the container has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise SampleError(Status.TOO_LARGE, f"{path}: {w}x{h} frames are more than the limit of {max_pixels} pixels")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
        seconds = seconds or (container.duration / av.time_base if container.duration else 0.0)
        n = int(stream.frames or 0)
        if n <= 0:
            n = _count_packets(container, stream, max_frames, check)
    if n > max_frames:
        raise SampleError(Status.TIMEOUT, f"{path}: more than {max_frames} frames (the frame-count cap); refused")
    return _Probe(n=n, expected=seconds * fps, fps=fps)


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream, max_frames: int, check: Callable[[], None]) -> int:
    n = 0
    try:
        for packet in container.demux(stream):
            check()
            n += 1 if packet.size else 0
            if n > max_frames:
                break
    except (av.error.FFmpegError, OSError, ValueError):
        pass  # a damaged tail: the frames before it still count, the decode pass reports the damage
    return n


def _grab(path: Path, want: np.ndarray, fps: float, check: Callable[[], None]) -> _Grab:
    """Decode frames 0..max(want) in order, keeping the wanted ones at the first frame's size."""
    targets, last = {int(i) for i in want}, int(want.max())
    grab, size = _Grab(), None
    try:
        with _open(path) as container:
            stream = container.streams.video[0]
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
            for frame in _frames(container, stream, grab):
                check()
                if grab.decoded in targets:
                    size = size or (frame.width, frame.height)
                    t = frame.time - start if frame.time is not None else (grab.decoded / fps if fps else 0.0)
                    grab.kept[grab.decoded] = (frame.to_ndarray(format="rgb24", width=size[0], height=size[1]), t)
                grab.decoded += 1
                if grab.decoded > last:
                    break
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        grab.error = f"{type(e).__name__}: {e}"
    return grab


def _frames(container: av.container.InputContainer, stream: av.VideoStream, grab: _Grab) -> Iterator[av.VideoFrame]:
    """Frames in presentation order, up to the first packet the demuxer marks corrupt (its data was cut short)."""
    for packet in container.demux(stream):
        if packet.is_corrupt:
            grab.error = "the demuxer found a packet cut short"
            yield from stream.codec_context.decode(None)  # the frames still buffered in the decoder are whole
            return
        yield from packet.decode()
