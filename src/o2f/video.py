"""Frames in and out: a video file or a sequence of image files, streamed one frame at a
time, and an annotated video written as the frames come.

Video files are read and written with PyAV (the ``video`` extra: ``pip install o2f[video]``).
Nothing holds more than the frame being decoded or encoded, so memory stays flat over a
long video. A file that cannot be opened, or a frame that cannot be decoded, raises
:class:`FrameError` with a one-line message naming the file and the frame; the frames read
before it have already been handed on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["VIDEO_SUFFIXES", "Frame", "FrameError", "VideoWriter", "count_frames",
           "read_image_frames", "read_video", "video_rate"]

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts",
                  ".wmv", ".flv", ".gif"}


class FrameError(RuntimeError):
    """A video or frame could not be read; the message names the file and the frame."""


@dataclass
class Frame:
    """One frame: ``image`` uint8 3 x H x W RGB; ``index`` counts from 0 in its source;
    ``file`` is the video (or the frame's own image file); ``time`` is the presentation
    time in seconds (None for image files)."""

    index: int
    image: Tensor
    file: Path
    time: float | None = None


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise FrameError("reading or writing video needs PyAV: pip install 'o2f[video]'"
                         ) from None
    return av


def _one_line(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)  # FFmpeg's reason without errno and file
    return " ".join(str(text).split()) or type(e).__name__


def read_video(path: str | Path) -> Iterator[Frame]:
    """The frames of a video file, decoded one at a time (the first video stream)."""
    av = _av()
    path = Path(path)
    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except (OSError, av.FFmpegError, IndexError) as e:
        reason = "no video stream" if isinstance(e, IndexError) else _one_line(e)
        raise FrameError(f"{path}: cannot open video: {reason}") from None
    index = 0
    try:
        decoded = container.decode(stream)
        while True:
            try:
                frame = next(decoded)
                image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            except StopIteration:
                return
            except (av.FFmpegError, ValueError) as e:
                raise FrameError(f"{path}: frame {index}: cannot decode: {_one_line(e)}"
                                 ) from None
            yield Frame(index, image, path, None if frame.time is None else float(frame.time))
            index += 1
    finally:
        container.close()


def video_rate(path: str | Path) -> Fraction | None:
    """Frames per second of a video file's first video stream (None when unknown)."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
    except (OSError, av.FFmpegError, IndexError):
        return None
    return Fraction(rate) if rate else None


def count_frames(path: str | Path) -> int | None:
    """The frame count a video file's header announces (None when it does not say)."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            return int(container.streams.video[0].frames) or None
    except (OSError, av.FFmpegError, IndexError):
        return None


def read_image_frames(paths: list[Path]) -> Iterator[Frame]:
    """Image files as the frames of a sequence, read one at a time, in the given order."""
    from PIL import Image, UnidentifiedImageError

    for index, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                array = torch.from_numpy(_rgb_array(img))
        except UnidentifiedImageError:
            raise FrameError(f"{path}: frame {index}: cannot read image: not an image "
                             "format Pillow can read, or a broken file") from None
        except (OSError, ValueError) as e:
            raise FrameError(f"{path}: frame {index}: cannot read image: {_one_line(e)}"
                             ) from None
        yield Frame(index, array.permute(2, 0, 1), path)


def _rgb_array(img: Any) -> Any:
    import numpy as np

    return np.array(img.convert("RGB"))


class VideoWriter:
    """An H.264 (or MPEG-4 Part 2 where H.264 is missing) video written frame by frame.

    The stream opens at the first frame, whose size fixes the video's; odd sides are padded
    by one black pixel (4:2:0 chroma needs even sides). ``close`` flushes the encoder, so
    everything written before an error is kept."""

    def __init__(self, path: str | Path, fps: float | Fraction = 25) -> None:
        self.av = _av()
        self.path, self.fps = Path(path), Fraction(fps).limit_denominator(1001)
        self.container: Any = None
        self.stream: Any = None
        self.frames = 0

    def write(self, image: Tensor) -> None:
        """Append one uint8 3 x H x W RGB frame."""
        av = self.av
        if self.container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), mode="w")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=self.fps)
            self.stream.height = image.shape[1] + image.shape[1] % 2
            self.stream.width = image.shape[2] + image.shape[2] % 2
            self.stream.pix_fmt = "yuv420p"
        h, w = self.stream.height, self.stream.width
        if image.shape[1:] != (h, w):
            canvas = torch.zeros(3, h, w, dtype=torch.uint8)
            ih, iw = min(h, image.shape[1]), min(w, image.shape[2])
            canvas[:, :ih, :iw] = image[:, :ih, :iw]
            image = canvas
        frame = av.VideoFrame.from_ndarray(image.permute(1, 2, 0).contiguous().numpy(),
                                           format="rgb24")
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))
            self.container.close()
            self.container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
