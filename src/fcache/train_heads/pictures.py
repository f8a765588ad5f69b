"""Pictures of an evaluation's predictions for TensorBoard and W&B, made from the files it wrote into RUN/eval/<store>/.

A store holds features, not images, so the pictures show the predictions alone; each task draws its own
(``TaskDef.pictures``: detection boxes and masks on a grey canvas, segmentation label maps, depth maps in colour, the
confusion matrix of label tasks), the first ``LIMIT`` samples of each, with the helpers here (which import no task:
the tasks' hooks import them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

LIMIT = 4  # pictures of one evaluation
PER_IMAGE = 10  # detections drawn per picture
MIN_SIDE = 256  # pictures are enlarged (nearest neighbour) to at least this long side


def enlarge(image: np.ndarray) -> np.ndarray:
    """``image`` scaled up by a whole factor (nearest neighbour) until its long side is at least MIN_SIDE."""
    f = max(1, -(-MIN_SIDE // max(image.shape[:2])))
    return np.ascontiguousarray(image.repeat(f, axis=0).repeat(f, axis=1)) if f > 1 else image


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; None when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None
