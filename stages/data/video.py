"""Probe and sample video files with PyAV (libav* bundled in its wheel, threads on, no external ffmpeg needed).

Sampling never decodes a whole long video: `probe` reads the demuxer's index, checked, or the packets (no decoding)
to learn every frame's presentation time and where the keyframes are; `sample` then seeks to the keyframe before
each wanted frame when that skips decoding, decodes forward to it (never a frame that is neither wanted nor referred
to by another), and converts only the frames it keeps. Frames are chosen by time, so variable-frame-rate files are
sampled evenly, and rotation metadata is applied as ffmpeg's autorotate does.
"""
import itertools
import math
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image, ImageOps

FRAME_FACTOR = 2        # fps mode: frame counts are even, as Qwen2-VL merges frame pairs (qwen-vl-utils)
PATCH_FACTOR = 28       # max_pixels mode: sides are multiples of 28 (Qwen2-VL / Qwen2.5-VL patch 14 x merge 2)
# libswscale's SIMD paths round differently from its C path (other bytes on an AVX-512 machine than on an AVX2 one)
# unless told to be bit-exact; checked with av_force_cpu_flags(0) in tests/test_reproducible.py
EXACT_BICUBIC = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.BITEXACT
AUDIO_RATE = 16_000    # Hz, mono: what Whisper-style speech models take
KEYFRAME, DISCARD = 1, 4   # AVIndexEntry flags: AVINDEX_KEYFRAME, AVINDEX_DISCARD_FRAME (libavformat/avformat.h)
FRAME_THREADS_FROM = 700_000   # pixels per frame from which frames decode on frame threads (set_threads)
SPLIT_PAYS_BELOW = 0.75   # sample(threads > 1): decoders share a video when none would do more than this share
# a libswscale context per converting thread, kept from frame to frame (PyAV makes one per frame: about 0.7 ms each
# at 360p, measured); a context is used by one thread at a time
CONVERTERS = threading.local()


class VideoError(Exception):
    """A video that cannot be probed or decoded; the message is the quarantine reason."""


@dataclass
class Sampled:
    frames: np.ndarray          # uint8 [n, height, width, 3], RGB, upright
    timestamps: np.ndarray      # float64 [n], seconds from the stream start
    indices: np.ndarray         # int64 [n], frame numbers in presentation order
    info: dict                  # codec, width, height, fps, total_frames, duration, rotation of the source


@dataclass
class Probe:
    times: np.ndarray           # float64 [total], every frame's presentation time in seconds, sorted
    keyframes: np.ndarray       # float64, presentation times of the keyframes, sorted
    info: dict


def uniform_indices(total: int, count: int) -> np.ndarray:
    """`count` frame numbers spread evenly over [0, total-1], first and last included (the qwen-vl-utils rule)."""
    return np.linspace(0, total - 1, count).round().astype(np.int64)


def frame_count(total: int, duration: float, p: dict) -> int:
    """How many frames to sample: `num_frames`, or `fps` frames per second bounded by min/max_frames, rounded down
    to an even count (the qwen-vl-utils `smart_nframes` rule; never more frames than the video has)."""
    if p.get("num_frames"):
        return p["num_frames"]
    low = math.ceil(p["min_frames"] / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(p["max_frames"], total) / FRAME_FACTOR) * FRAME_FACTOR
    wanted = min(max(duration * p["fps"], low), high, total)
    return max(math.floor(wanted / FRAME_FACTOR) * FRAME_FACTOR, 1)


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int,
                 factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """(height, width): sides rounded to multiples of `factor`, aspect kept, area within [min_pixels, max_pixels].

    The qwen-vl-utils `smart_resize` rule (vision_process.py), so that frames fit Qwen2-VL's patch grid unchanged.
    """
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"aspect ratio over 200: {width}x{height}")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def output_shape(height: int, width: int, p: dict) -> tuple[int, int]:
    """Frame size the params ask for: frame_size x frame_size, or the Qwen rule under max_pixels."""
    if p.get("max_pixels"):
        return smart_resize(height, width, p.get("min_pixels", 0), p["max_pixels"])
    return p["frame_size"], p["frame_size"]


def open_video(path):
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise VideoError(f"cannot open: {error}") from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:   # a codec id libav has no decoder for (found by tests/test_fuzz.py)
        container.close()
        raise VideoError("no decoder for the video stream's codec")
    return container, stream


def set_threads(stream, alone: bool) -> None:
    """The decoder's threads, before its first packet. Frame threads pay off from about 720p for a decoder `alone`;
    below, their start-up on every seek costs more than they save, and the core they take is the one the conversion
    thread uses (sample; measured on 2 cores: 128x72 to 960x540 sample 6-25 % faster on slice threads, 1280x720 10 %
    faster on frame threads). Decoders sharing a video (`sample`'s threads) take one core each and no threads of
    their own: 8 % faster at 720p than each on frame threads, and at 128x72 idle slice threads woken for every frame
    cost more than the decoding."""
    if not alone:
        stream.codec_context.thread_count = 1
        return
    pixels = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
    stream.thread_type = "AUTO" if pixels >= FRAME_THREADS_FROM else "SLICE"


def check_size(width: int, height: int, p: dict) -> None:
    """VideoError when a picture is larger than extract.max_source_pixels: checked from what a header claims, before
    a decoder allocates it (a 16000 x 16000 claim would cost 384 MB per frame)."""
    limit = p.get("max_source_pixels")
    if limit and width * height > limit:
        raise VideoError(f"claims {width}x{height} pixels, over extract.max_source_pixels={limit}")


def check_frames(count: int, p: dict, says: str = "has") -> None:
    """VideoError when a video has (or its header claims) more frames than extract.max_source_frames."""
    limit = p.get("max_source_frames")
    if limit and count > limit:
        raise VideoError(f"{says} {count} frames, over extract.max_source_frames={limit}")


def check_header(stream, p: dict) -> None:
    """The limits, from the stream header alone (no packet read yet)."""
    context = stream.codec_context
    check_size(context.width or 0, context.height or 0, p)
    check_frames(stream.frames or 0, p, says="claims")


def probe(container, stream, p: dict | None = None) -> Probe:
    """Every frame's time and the keyframes, from the packets (header frame counts and rates can lie): from the
    demuxer's index where it can be checked to say exactly what the packets say (`indexed`), else by reading every
    packet (`scanned`). Leaves the demuxer anywhere: callers seek before they decode."""
    p = p or {}
    try:
        times, keyframes = indexed(container, stream, p) or rescanned(container.name, stream.index, p)
    except av.FFmpegError as error:
        raise VideoError(f"demux failed: {error}") from None
    base = float(stream.time_base)
    times = np.sort(np.asarray(times, dtype=np.float64)) * base
    # the span between first and last frame, plus one frame's share: 16 frames at 8 fps last 2 s, not 1.875 s
    duration = float(times[-1] - times[0]) * len(times) / (len(times) - 1) if len(times) > 1 else 0.0
    context = stream.codec_context
    if not context.width or not context.height:
        raise VideoError("no frame size in the stream header")
    info = {"codec": context.name, "width": context.width, "height": context.height,
            "fps": float(stream.average_rate or 0), "total_frames": len(times), "duration": round(duration, 4)}
    return Probe(times, np.sort(np.asarray(keyframes, dtype=np.float64)) * base, info)


def scanned(container, stream, p: dict) -> tuple[list[int], list[int]]:
    """(presentation time of every packet, of every keyframe packet), in the stream's time base, read packet by
    packet. Stops as soon as there are more packets than extract.max_source_frames, so a million-frame file costs
    no more than the limit."""
    times, keyframes, limit = [], [], p.get("max_source_frames")
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if limit and len(times) == limit:
            check_frames(limit + 1, p, says="has at least")
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None:
            raise VideoError("packets carry no timestamps")
        times.append(stamp)
        if packet.is_keyframe:
            keyframes.append(stamp)
    if not times:
        raise VideoError("video stream has no frames")
    return times, keyframes or [min(times)]   # no keyframe flags: decode from the start, never seek past one


def rescanned(name: str, index: int, p: dict) -> tuple[list[int], list[int]]:
    """`scanned` from the first packet of the file `name`, through a handle of its own (`indexed` may have moved the
    caller's demuxer)."""
    with av.open(name) as reader:
        return scanned(reader, reader.streams[index], p)


def indexed(container, stream, p: dict) -> tuple[np.ndarray, list[int]] | None:
    """What `scanned` gives, from the demuxer's index (an MP4's sample tables: every frame's decode time, size and
    keyframe flag) and a few packets, or None where the index cannot be checked to agree. Reading the 45,000 packets
    of a 25-minute clip costs 0.15 s; this, 0.03 s.

    The index holds decode times; presentation times are those shifted by the reordering delay, which holds when
    the index has one entry per frame of the header's count, none empty or discarded (edit lists), and a constant
    frame duration. The delay comes from the first packets (the earliest presentation time among them), which must
    all fall on the shifted times; each keyframe's own presentation time is read from its packet (an open GOP shows
    frames before its keyframe), after a seek that must land on it. Anything else: None, and `scanned` reads all."""
    count = len(stream.index_entries)
    if count < 2 or count != stream.frames:
        return None
    check_frames(count, p)
    entries = stream.index_entries[0:count]   # one slice: a Python object per entry is the cost, made once
    decode_times, flags, sizes = (np.fromiter(map(attrgetter(field), entries), np.int64, count)
                                  for field in ("timestamp", "flags", "size"))
    steps = np.diff(decode_times)
    if (flags & DISCARD).any() or not sizes.all() or steps[0] <= 0 or steps.min() != steps.max():
        return None
    key_decode_times = decode_times[(flags & KEYFRAME) != 0].tolist()
    if not key_decode_times:
        return None
    try:
        return checked_against_packets(container, stream, decode_times, key_decode_times)
    except av.FFmpegError:   # the packets themselves will tell, or give the error
        return None


def checked_against_packets(container, stream, decode_times: np.ndarray, key_decode_times: list[int]):
    """`indexed`'s presentation times and keyframes, checked against the first packets and every keyframe packet
    (read from the container's start, then by seeking); None on a mismatch."""
    first = [packet.pts for packet in itertools.islice(container.demux(stream), 32) if packet.size]
    if not first or None in first:
        return None
    delay = min(first) - int(decode_times[0])
    times, step = decode_times + delay, int(decode_times[1] - decode_times[0])

    def valid(pts: int | None) -> bool:   # one of the shifted times, which are evenly spaced (checked by the caller)
        return pts is not None and times[0] <= pts <= times[-1] and (pts - times[0]) % step == 0
    if not all(map(valid, first)):
        return None
    keyframes = []
    for key in key_decode_times:
        container.seek(key + delay, stream=stream, backward=True)
        packet = next(container.demux(stream), None)
        if packet is None or packet.dts != key or not packet.is_keyframe or not valid(packet.pts):
            return None
        keyframes.append(packet.pts)
    return times, keyframes


def to_rgb(frame, turns: int, shape: tuple[int, int]) -> np.ndarray:
    """The frame resized to shape (height, width) of the upright picture, bicubic in libswscale as ffmpeg's `scale`
    does (one pass from YUV, no full-size RGB copy), then turned upright: `turns` quarter turns counter-clockwise,
    as ffmpeg's autorotate applies the stream's rotation metadata. Bit-exact: the same bytes on every CPU."""
    height, width = shape[::-1] if turns % 2 else shape
    if not hasattr(CONVERTERS, "reformatter"):
        CONVERTERS.reformatter = VideoReformatter()
    rgb = CONVERTERS.reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                          interpolation=EXACT_BICUBIC).to_ndarray()
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def keyframe_before(keyframes: np.ndarray, time: float) -> float:
    return keyframes[max(np.searchsorted(keyframes, time + 1e-6, side="right") - 1, 0)]


def seeks(keyframe, last):
    """Whether decoding on from the frame at time `last` to a frame whose keyframe is `keyframe` seeks first: the
    keyframe lies past it (the rule of decode_at, which split_runs cuts by; numpy arrays too)."""
    return keyframe > last + 1e-6


def skipped(pts: int | None, wanted: set[int]) -> bool:
    """Whether the packet of presentation time `pts` may go undecoded when no other frame refers to it (skip_frame
    NONREF: most B-frames): whenever it is not a wanted frame's."""
    return pts is not None and pts not in wanted


def decoded_from(container, stream, wanted: set[int] | None):
    """The frames decoded from the container's position on, each packet sent with its own skip_frame: NONREF for a
    packet `skipped` says may go, so frames nobody wants or refers to are never decoded, the rest exactly as they would
    be (libav reads skip_frame per packet, frame threads too). `wanted` None: nothing is skipped."""
    context = stream.codec_context
    for packet in container.demux(stream):
        skip = "NONREF" if wanted is not None and skipped(packet.pts, wanted) else "DEFAULT"
        if context.skip_frame != skip:
            context.skip_frame = skip
        yield from context.decode(packet)   # the last, empty packet drains the decoder


def advance(frames, frame, target: float) -> tuple:
    """Decode forward to the first frame at or after `target`: (that frame or None at the end, frames decoded)."""
    decoded = 0
    while frame is None or frame.time < target - 1e-6:
        frame, decoded = next(frames, None), decoded + 1
        if frame is None:
            break
        if frame.time is None:
            raise VideoError("decoded frames carry no timestamps")
    return frame, decoded


def decode_at(container, stream, wanted: np.ndarray, keyframes: np.ndarray, convert) -> tuple[dict, int]:
    """({time: converted frame} for the presentation times `wanted` (sorted), frames decoded).

    Seeks only when a keyframe lies between the last decoded frame and the next wanted one, so dense targets cost one
    forward pass, and decodes no frame that is neither wanted nor referred to (`decoded_from`). Should a wanted frame
    go missing anyway (a decoder that applied a skip late), it is decoded again from its keyframe, skipping nothing.
    """
    base, found, frames, frame, decoded = float(stream.time_base), {}, None, None, 0
    wanted_pts = {round(target / base) for target in wanted}
    for target in wanted:
        for careful in (False, True):
            keyframe = keyframe_before(keyframes, target)
            if frames is None or careful or seeks(keyframe, frame.time):
                container.seek(round(keyframe / base), stream=stream, backward=True)
                frames, frame = decoded_from(container, stream, None if careful else wanted_pts), None
            frame, count = advance(frames, frame, target)
            decoded += count
            if frame is None:
                return found, decoded   # the stream ended early; the caller reports what is missing
            if abs(frame.time - target) < 1e-6:
                found[target] = convert(frame)
                break
            if careful:
                break   # no frame at that time; the caller reports it
    return found, decoded


def pick_frames(times: np.ndarray, count: int) -> np.ndarray:
    """Frame numbers of `count` instants spread evenly over the video: uniform_indices on a constant frame rate;
    on a variable one, the frames nearest to evenly spaced times (frame numbers would crowd the dense stretches)."""
    steps = np.diff(times)
    if len(times) < 3 or np.ptp(steps) <= 0.01 * steps.mean():
        return uniform_indices(len(times), count)
    goals = np.linspace(times[0], times[-1], count)
    after = np.clip(np.searchsorted(times, goals), 1, len(times) - 1)
    earlier = np.abs(times[after - 1] - goals) <= np.abs(times[after] - goals)
    return np.where(earlier, after - 1, after).astype(np.int64)


def split_runs(wanted: np.ndarray, known: Probe, threads: int) -> list[np.ndarray]:
    """`wanted` (sorted times) cut into at most `threads` runs for decoders of their own, each cut where `decode_at`
    seeks anyway (the next wanted frame's keyframe lies past the one before it), so every frame is decoded from the
    same keyframe as by one decoder: the same bytes. Runs are balanced by the frames from each seek to its last wanted
    frame; one run where the largest share would still be over SPLIT_PAYS_BELOW of the whole (one long GOP: a second
    decoder's start-up would cost more than it saves)."""
    keys = np.array([keyframe_before(known.keyframes, time) for time in wanted])
    starts = np.flatnonzero(np.r_[True, seeks(keys[1:], wanted[:-1])])   # where decode_at seeks
    if threads < 2 or len(starts) < 2:
        return [wanted]
    ends = np.r_[starts[1:], len(wanted)]
    frames = (np.searchsorted(known.times, wanted[ends - 1] + 1e-6)
              - np.searchsorted(known.times, keys[starts] - 1e-6)).astype(np.float64)
    # each group of seeks goes to the run its frames' midpoint falls in: contiguous runs of about equal work
    runs = np.minimum(((np.cumsum(frames) - frames / 2) * threads / frames.sum()).astype(int), threads - 1)
    work = np.bincount(runs, weights=frames, minlength=threads)
    if work.max() > SPLIT_PAYS_BELOW * frames.sum():
        return [wanted]
    cuts = [starts[i] for i in range(1, len(starts)) if runs[i] != runs[i - 1]]
    return np.split(wanted, cuts)


def sample(path, p: dict, threads: int = 1) -> Sampled:
    """Sample a video as the extract params say: which frames (num_frames, or fps with min/max_frames) and at what
    size (frame_size, or max_pixels with the Qwen rule). With `threads` > 1, stretches of the video far apart are
    decoded at once, each by a decoder of its own (`split_runs`), and frames convert on that many threads: for one
    video on idle cores (`ask`, or fewer videos than workers in `extract`)."""
    container, stream = open_video(path)
    with container:
        check_header(stream, p)
        known = probe(container, stream, p)
        indices = pick_frames(known.times, frame_count(len(known.times), known.info["duration"], p))
        wanted = np.unique(known.times[indices])
        runs = split_runs(wanted, known, threads)
        rotation = {}

        def convert(frame):   # the first frame's rotation tells which side is the height
            check_size(frame.width, frame.height, p)   # a stream may change size past its header
            turns = rotation.setdefault("turns", round((frame.rotation or 0) / 90) % 4)
            height, width = (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)
            return to_rgb(frame, turns, output_shape(height, width, p))

        def decode_run(number: int, run: np.ndarray, converter) -> tuple[dict, int]:
            reader, video = (container, stream) if number == 0 else open_video(path)
            set_threads(video, alone=len(runs) == 1)
            try:
                return decode_at(reader, video, run, known.keyframes, lambda frame: converter.submit(convert, frame))
            finally:
                if number:
                    reader.close()
        try:   # each kept frame is converted on a thread of its own while decoding goes on (libswscale frees the GIL)
            with ThreadPoolExecutor(max_workers=max(threads, 1)) as converter, \
                    ThreadPoolExecutor(max_workers=len(runs)) as decoders:
                decoded_runs = list(decoders.map(decode_run, range(len(runs)), runs, itertools.repeat(converter)))
                found = {time: converted.result() for pending, _ in decoded_runs for time, converted in pending.items()}
        except av.FFmpegError as error:
            raise VideoError(f"decode failed: {error}") from None
    if len(found) < len(wanted):
        raise VideoError(f"cut short or damaged: decoded {len(found)} of the {len(wanted)} frames wanted")
    times = known.times[indices]
    frames = np.stack([found[t] for t in times])   # a short video repeats frames so every sample has `count`
    info = {**known.info, "rotation": 90 * rotation.get("turns", 0),
            "decoded_frames": sum(decoded for _, decoded in decoded_runs)}
    return Sampled(frames, times - known.times[0], indices, info)


def read_audio(path, rate: int = AUDIO_RATE) -> np.ndarray:
    """The first audio stream as float32 mono at `rate` Hz; an empty array when the file has no audio."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return np.zeros(0, dtype=np.float32)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [out.to_ndarray().reshape(-1) for frame in container.decode(container.streams.audio[0])
                      for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.FFmpegError, OSError) as error:
        raise VideoError(f"audio decode failed: {error}") from None
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)


def sample_images(archive, p: dict, duration: float | None = None) -> Sampled:
    """Sample frames already extracted by another tool (`archive`: a binary file of a tar of images, from a manifest
    v1 import) by the same rules as a video. Their times are spread over `duration` when known, else one image per
    second is assumed."""
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            members = sorted(safe_members(tar), key=lambda m: m.name)
            if not members:
                raise VideoError("frame archive holds no images")
            check_frames(len(members), p)
            step = duration / len(members) if duration else 1.0
            times = np.arange(len(members)) * step
            indices = pick_frames(times, frame_count(len(members), step * len(members), p))
            images = {}
            for index in np.unique(indices):
                with Image.open(tar.extractfile(members[index])) as image:
                    check_size(image.width, image.height, p)   # from the image header, before decoding
                    image = ImageOps.exif_transpose(image).convert("RGB")
                    images[index] = image
            height, width = images[indices[0]].height, images[indices[0]].width
    except (tarfile.TarError, OSError, Image.DecompressionBombError) as error:   # PIL: OSError when unreadable
        raise VideoError(f"cannot read frame images: {error}") from None
    shape = output_shape(height, width, p)
    frames = np.stack([np.asarray(images[i].resize((shape[1], shape[0]), Image.BICUBIC)) for i in indices])
    info = {"codec": "images", "width": width, "height": height, "fps": 1 / step, "total_frames": len(members),
            "duration": round(step * len(members), 4), "rotation": 0}
    return Sampled(frames, times[indices], indices, info)


def safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's files; VideoError when any member is a link, a device or a name that would leave the folder
    (absolute, or with ..): an archive holding one is not a frame folder we packed, so none of it is trusted."""
    files = []
    for member in tar.getmembers():
        name = member.name.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
            raise VideoError(f"frame archive member {member.name!r}: path leaves the archive folder")
        if member.issym() or member.islnk():
            raise VideoError(f"frame archive member {member.name!r}: links are refused")
        if member.isfile():
            files.append(member)
        elif not member.isdir():
            raise VideoError(f"frame archive member {member.name!r}: not a file (device or FIFO)")
    return files
