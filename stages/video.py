"""Probe and sample video files with PyAV (libav* bundled in its wheel, threads on, no external ffmpeg needed)."""
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image


class VideoError(Exception):
    """A video that cannot be probed or decoded; the message is the quarantine reason."""


@dataclass
class Sampled:
    frames: np.ndarray          # uint8 [n, size, size, 3], RGB
    timestamps: np.ndarray      # float64 [n], seconds from the stream start
    indices: np.ndarray         # int64 [n], frame numbers in presentation order
    info: dict                  # codec, width, height, fps, total_frames of the source


def uniform_indices(total: int, count: int) -> np.ndarray:
    """`count` frame numbers spread evenly over [0, total-1], first and last included (the qwen-vl-utils rule)."""
    return np.linspace(0, total - 1, count).round().astype(np.int64)


def sample_uniform(path, count: int, size: int) -> Sampled:
    """Decode `count` uniformly spaced frames of `path`, resized to size x size RGB."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as error:
        raise VideoError(f"cannot open: {error}") from None
    with container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        info = {"codec": stream.codec_context.name, "width": stream.codec_context.width,
                "height": stream.codec_context.height, "fps": float(stream.average_rate or 0)}
        try:
            # Count frames from packets (demuxing only, no decoding): header frame counts can lie.
            total = sum(1 for packet in container.demux(stream) if packet.size)
            if total == 0:
                raise VideoError("video stream has no frames")
            targets = uniform_indices(total, count)
            container.seek(0, stream=stream)
            frames, stamps, index, wanted = [], [], 0, iter(np.unique(targets))
            next_target = next(wanted)
            for frame in container.decode(stream):
                if index == next_target:
                    image = frame.to_image().resize((size, size), Image.BICUBIC)
                    frames.append(np.asarray(image.convert("RGB")))
                    stamps.append(float(frame.time if frame.time is not None else index / (info["fps"] or 1)))
                    next_target = next(wanted, None)
                    if next_target is None:
                        break
                index += 1
        except av.FFmpegError as error:
            raise VideoError(f"decode failed: {error}") from None
    if len(frames) < len(np.unique(targets)):
        raise VideoError(f"decoded {index} of {total} frames the container announced")
    # a short video may repeat a frame number; repeat its picture too so that every sample has `count` frames
    position = {t: i for i, t in enumerate(np.unique(targets))}
    order = [position[t] for t in targets]
    return Sampled(np.stack(frames)[order], np.asarray(stamps)[order], targets, {**info, "total_frames": total})
