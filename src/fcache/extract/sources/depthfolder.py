"""The ``depth-folder`` source: any monocular depth set (NYU-Depth v2, KITTI, DIODE, ... exported) as ``images/`` + ``depth/``.

``--root`` holds ``images/<name>.<ext>`` and ``depth/<name>.png`` or ``depth/<name>.npy`` (with ``--split S``:
``images/S/`` and ``depth/S/``), laid out as ``seg-folder`` is. A PNG is single-channel (16-bit, as NYU-Depth v2 and
KITTI are exported) in units of 1 / ``--depth-scale`` metre (default 1000: millimetres; KITTI's PNGs are 256); a
``.npy`` is an (H, W) float array in metres (``--depth-scale`` 1 unless given). 0 marks a pixel without a measurement
(so do negative and non-finite values): it is stored as 0 and left out of the loss and the metrics. The store's
``depth`` target holds float32 metres at original resolution, padded with 0, oriented with its image like a label map
(``labelmap.py``). A depth file that is empty, unreadable, of another shape than a single channel, or of another size
than its image costs its sample (its status); an image without its depth file, a depth file without its image and two
images of one name are metadata problems, reported together before any backbone work.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from fcache.extract.decode import DEFAULT_MAX_PIXELS, load_image, read_media
from fcache.extract.sources.base import SampleError, SampleRef
from fcache.extract.sources.labelmap import LabelMapSource, check_split, split_folders
from fcache.spec import Status, Targets

PNG_SCALE = 1000.0  # PNG depth units per metre unless --depth-scale says otherwise: millimetres
GREY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "I;16N")


def npy_shape(path: Path) -> tuple[int, ...]:
    """The shape of a .npy file from its header (ValueError when it is not a numeric array)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    if dtype.kind not in "uif" or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 1):
        raise ValueError(f"a depth array is (H, W) or (H, W, 1) of numbers, not {shape} {dtype}")
    return tuple(shape)


class DepthFolderSource(LabelMapSource):
    """Images + depth maps (16-bit PNG or float .npy); target ``depth`` (metres, 0 = invalid) written by workers."""

    kind = "depth-folder"
    task = "depth"
    labels_name = "depth map"
    strict_pairs = True
    label_suffixes = (".png", ".npy")
    target, target_dtype, target_fill = Targets.DEPTH, "float32", 0.0  # metres, 0 = no measurement

    def __init__(self, root: str | Path, *, split: str = "", scale: float = 0.0, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, max_pixels=max_pixels)
        check_split(split, "depth")
        self.split, self.scale = split, scale

    def folders(self) -> tuple[Path, Path]:
        return split_folders(self.root, self.split, "depth", "images/<name>.<ext> + depth/<name>.png or .npy")

    def label_names(self) -> tuple[str, ...]:
        return ()

    def label_size(self, path: Path) -> tuple[int, int]:
        if path.suffix.lower() == ".npy":
            h, w = npy_shape(path)[:2]
            return w, h
        return super().label_size(path)

    def open_label(self, ref: SampleRef) -> Image.Image:
        path = str(ref.extra["label"])
        if not path.lower().endswith(".npy"):
            im, _ = load_image(path, root=self.root, max_pixels=self.max_pixels)
            if im.mode not in GREY_MODES:
                raise SampleError(Status.DECODE_ERROR, f"{path}: a depth PNG is grey (8 or 16 bits), not {im.mode}")
            return im
        try:
            a = np.load(io.BytesIO(read_media(path, root=self.root)), allow_pickle=False)
        except Exception as e:  # a cut or foreign file costs its sample
            raise SampleError(Status.DECODE_ERROR, f"{path}: not a .npy array ({type(e).__name__}: {e})") from None
        if a.dtype.kind not in "uif" or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 1):
            raise SampleError(Status.DECODE_ERROR, f"{path}: a depth array is (H, W) or (H, W, 1) of numbers, not {a.shape} {a.dtype}")
        if a.shape[0] * a.shape[1] > self.max_pixels:
            raise SampleError(Status.TOO_LARGE, f"{path}: {a.shape[1]}x{a.shape[0]} is more than the limit of {self.max_pixels} pixels")
        return Image.fromarray(np.ascontiguousarray(a.reshape(a.shape[:2]), dtype=np.float32), mode="F")

    def to_target(self, values: np.ndarray, ref: SampleRef) -> np.ndarray:
        """Metres (float32) from the file's units; 0 where there is no measurement (0, negative or not finite)."""
        scale = self.scale or (1.0 if str(ref.extra["label"]).lower().endswith(".npy") else PNG_SCALE)
        metres = values.astype(np.float64) / scale
        return np.where(np.isfinite(metres) & (metres > 0), metres, 0.0).astype(np.float32)
