"""The bad-input corpus: a generated folder of broken, odd and ordinary videos, each with what
extracting it must give.

`make_corpus(folder)` writes every kind under `folder` (targets of the links that lead outside it go
to a sibling folder) and returns the kinds. A kind expects one of:

* `ok`: extracted; `facts` are manifest columns as they must be (a tuple: any of), `audio` whether
  audio tokens exist; every ok row is sampled with `NUM_FRAMES` frames.
* `failed`: a row with status failed, the `qprep.errors` code `code` and a cause containing `cause`.
* `skipped`: no row. Hidden entries are passed over silently; links that are not followed (outside
  the folder, back up into a folder that holds them, to nothing) and files that are not regular
  files are reported in the run's summary (`Summary.skipped`) with a reason containing `cause`.
* `unavailable`: an encoder this FFmpeg build lacks; listed so that the gap shows.

`unprivileged` kinds (a file without read permission) can only fail for a user whom the
permission bits bind; root reads any file. They are checked by running discovery and the CPU
stage as such a user.

Clips are tiny (64×48, 8 fps, 1 s) except where size is the point, so the corpus builds in seconds.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath

import av
import numpy as np

from qprep.synth import VideoSpec, make_video

NUM_FRAMES = 4  # the extraction setting the expectations are written for
SMALL_FRAMES = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # frame-size bounds they are written for
SMALL = dict(width=64, height=48, fps=8, seconds=1.0)
AV1_ENCODERS = ("libaom-av1", "libsvtav1", "librav1e")
OK, FAILED, SKIPPED, UNAVAILABLE = "ok", "failed", "skipped", "unavailable"


@dataclass(frozen=True)
class Kind:
    name: str
    paths: tuple[str, ...]  # what it created under the folder ('/'-separated, as os.fsdecode gives names)
    expect: str
    ids: tuple[str, ...] = ()  # the rows it must produce (ok and failed kinds)
    code: str | None = None  # failed: the error code
    cause: str = ""  # failed: in the recorded cause; skipped: in the reported reason ("" when silent)
    facts: dict = field(default_factory=dict)  # ok: manifest columns
    audio: bool | None = None  # ok: whether there are audio tokens
    unprivileged: bool = False
    note: str = ""


def make_corpus(folder: str | Path) -> list[Kind]:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration to stderr otherwise
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir(exist_ok=True)
    kinds: list[Kind] = []
    for group in (_codecs, _containers, _audio, _geometry, _time, _broken, _names, _links, _special):
        kinds += group(folder, outside)
    return kinds


def video_id(path: str) -> str:
    return str(PurePosixPath(path).with_suffix(""))


def _ok(name, path, audio=True, note="", **facts) -> Kind:
    return Kind(name, (path,), OK, ids=(video_id(path),), facts=facts, audio=audio, note=note)


def _failed(name, path, code, cause, **extra) -> Kind:
    return Kind(name, (path,), FAILED, ids=(video_id(path),), code=code, cause=cause, **extra)


def _clip(folder: Path, path: str, **spec) -> str:
    make_video(folder / path, VideoSpec(**{**SMALL, **spec}))
    return path


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


# --- codecs and containers ----------------------------------------------------------------------

def _codecs(folder: Path, outside: Path) -> list[Kind]:
    av1 = next((name for name in AV1_ENCODERS if has_encoder(name)), None)
    wanted = [
        ("h264", "libx264", "codecs/h264.mp4", {}, ("h264",)),
        ("hevc", "libx265", "codecs/hevc.mp4", {}, ("hevc",)),
        ("vp9", "libvpx-vp9", "codecs/vp9.webm", {}, ("vp9", "libvpx-vp9")),
        ("av1", av1 or "av1 (" + " / ".join(AV1_ENCODERS) + ")", "codecs/av1.mkv", {}, ("av1", "libdav1d", "libaom-av1")),
        ("mpeg4", "mpeg4", "codecs/mpeg4.avi", dict(audio=False), ("mpeg4",)),
        ("mjpeg", "mjpeg", "codecs/mjpeg.avi", dict(audio=False, pix_fmt="yuvj420p"), ("mjpeg",)),
    ]
    kinds = []
    for label, encoder, path, spec, decoders in wanted:
        if not has_encoder(encoder):
            kinds.append(Kind(f"codec {label}", (), UNAVAILABLE, note=f"encoder {encoder} is not in this FFmpeg build"))
            continue
        _clip(folder, path, codec=encoder, **spec)
        kinds.append(_ok(f"codec {label} ({encoder})", path, audio=spec.get("audio", True), codec=decoders,
                         width=64, height=48, frame_count=8))
    return kinds


def _containers(folder: Path, outside: Path) -> list[Kind]:
    kinds = [
        _ok("mp4 with the index (moov) at the end", _clip(folder, "containers/moov-at-end.mp4"), codec="h264"),
        _ok("mp4 with the index first (faststart)", _clip(folder, "containers/faststart.mp4", faststart=True)),
        _ok("mkv (h264)", _clip(folder, "containers/mkv-h264.mkv"), codec="h264"),
        _ok("mkv (vp9)", _clip(folder, "containers/mkv-vp9.mkv", codec="libvpx-vp9"), codec=("vp9", "libvpx-vp9")),
        _ok("mov (h264)", _clip(folder, "containers/mov-h264.mov"), codec="h264"),
        _ok("webm (vp9 + opus)", _clip(folder, "containers/vp9-opus.webm", codec="libvpx-vp9")),
        _ok("mp4 (mpeg4 part 2)", _clip(folder, "containers/mpeg4.mp4", codec="mpeg4"), codec="mpeg4"),
        _ok("avi with audio (mpeg4 + aac)", _clip(folder, "containers/mpeg4-aac.avi", codec="mpeg4"), frame_count=8),
        _ok("upper-case extension", _clip(folder, "containers/UPPER.MP4")),
    ]
    path = "containers/dropped-frame.avi"
    _encode(folder / path, "mpeg4", 64, 48, rate=8, pts=[0, 1, 2, 4, 5, 6, 7, 8])
    kinds.append(_ok("avi with a dropped frame (an empty index entry)", path, audio=False, frame_count=8,
                     note="the container counts 9 frames, 8 hold pictures"))
    for label, bframes in (("with", 2), ("without", 0)):  # 3 s at 8 fps, keyframes each second, cut 0.3 s after one
        source = make_video(outside / f"source-cut-{label}.mp4", VideoSpec(
            **{**SMALL, "seconds": 3.0, "gop_seconds": 1.0, "bframes": bframes,
               "encoder_options": (("x264-params", "scenecut=0"),)}))
        path = f"containers/cut-with-stream-copy-{label}-b-frames.mp4"
        cut_with_stream_copy(source, folder / path, 1.3)
        kinds.append(_ok(f"mp4 cut with stream copy at a non-keyframe, {label} B-frames (an edit list)", path,
                         frame_count=13,
                         note="the container counts 16 frames; its edit list hides the 3 before the cut"))
    path = "containers/10bit-h264.mkv"
    kinds.append(_ok("10-bit h264", _clip(folder, path, pix_fmt="yuv420p10le"), codec="h264"))
    kinds.append(_ok("10-bit hevc", _clip(folder, "containers/10bit-hevc.mp4", codec="libx265", pix_fmt="yuv420p10le"),
                     codec="hevc"))
    av1 = next((name for name in AV1_ENCODERS if has_encoder(name)), None)
    if av1:
        kinds.append(_ok("10-bit av1", _clip(folder, "containers/10bit-av1.mkv", codec=av1, pix_fmt="yuv420p10le")))
    else:
        kinds.append(Kind("10-bit av1", (), UNAVAILABLE, note="no AV1 encoder in this FFmpeg build"))
    return kinds


# --- audio --------------------------------------------------------------------------------------

def _audio(folder: Path, outside: Path) -> list[Kind]:
    kinds = [
        _ok("no audio stream", _clip(folder, "audio/silent.mp4", audio=False), audio=False, audio_note="no audio stream"),
        _ok("mono 8 kHz audio", _clip(folder, "audio/mono-8khz.mp4", audio_rate=8000, audio_channels=1)),
        _ok("audio shorter than the video", _clip(folder, "audio/short-audio.mp4", audio_seconds=0.3)),
        _ok("7.1 audio (8-channel AAC)", _clip(folder, "audio/7.1.mp4", audio_channels=8)),
        _ok("12-channel PCM audio", _clip(folder, "audio/12-channels.mkv", audio_channels=12,
                                          audio_codec="pcm_s16le")),
    ]
    path = "audio/empty-audio-stream.mkv"
    _encode(folder / path, "libx264", 64, 48, rate=8, pts=range(8), empty_audio=True)
    kinds.append(_ok("an audio stream without samples", path, audio=False,
                     audio_note="the audio stream holds no samples in the window"))
    path = "audio/audio-only.mp4"
    write_audio_only(folder / path)
    kinds.append(_failed("audio only", path, "no_video_stream", "no video stream"))
    return kinds


# --- geometry -----------------------------------------------------------------------------------

def _geometry(folder: Path, outside: Path) -> list[Kind]:
    kinds = [
        _ok("1x1 pixel", _clip(folder, "geometry/1x1.mkv", width=1, height=1, pix_fmt="yuv444p", audio=False),
            audio=False, width=1, height=1),
        _failed("aspect ratio 300:1", _clip(folder, "geometry/aspect-300x1.mp4", width=1800, height=6, audio=False),
                "bad_geometry", "aspect ratio"),
        _failed("wider than 16384 pixels", _clip(folder, "geometry/16400x96.mkv", width=16400, height=96, fps=2,
                                                 codec="mjpeg", pix_fmt="yuvj420p", audio=False),
                "bad_geometry", "exceeds"),
        _ok("odd size 161x97 (h264 4:4:4)", _clip(folder, "geometry/odd-161x97.mp4", width=161, height=97,
                                                  pix_fmt="yuv444p"), width=161, height=97),
        _ok("odd size 99x57 (vp9)", _clip(folder, "geometry/odd-99x57.webm", width=99, height=57, codec="libvpx-vp9"),
            width=99, height=57),
        _ok("odd size 75x49 (mjpeg)", _clip(folder, "geometry/odd-75x49.mkv", width=75, height=49, codec="mjpeg",
                                            pix_fmt="yuvj420p"), width=75, height=49),
    ]
    path = "geometry/8k.mp4"
    _encode(folder / path, "libx264", 7680, 4320, rate=4, pts=range(4), options={"preset": "ultrafast"})
    kinds.append(_ok("8K (7680x4320)", path, audio=False, width=7680, height=4320, frame_count=4))
    for degrees in (90, 180, 270):
        path = _clip(folder, f"geometry/rotate-{degrees}.mp4", rotation=degrees)
        width, height = (48, 64) if degrees in (90, 270) else (64, 48)
        kinds.append(_ok(f"rotation {degrees}", path, rotation=degrees, width=width, height=height))
    return kinds


# --- time ---------------------------------------------------------------------------------------

def _time(folder: Path, outside: Path) -> list[Kind]:
    return [
        _ok("variable frame rate", _clip(folder, "time/vfr.mp4", vfr=True)),
        _failed("a single frame", _clip(folder, "time/single-frame.mp4", seconds=1 / 8, audio=False),
                "too_few_frames", "only 1"),
        _failed(f"fewer frames than the {NUM_FRAMES} asked", _clip(folder, "time/three-frames.mp4", seconds=3 / 8,
                                                                   audio=False),
                "too_few_frames", "only 3"),
    ]


# --- broken files -------------------------------------------------------------------------------

def _broken(folder: Path, outside: Path) -> list[Kind]:
    (folder / "broken").mkdir(parents=True, exist_ok=True)
    (folder / "broken/zero-bytes.mp4").write_bytes(b"")
    (folder / "broken/random-bytes.mp4").write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    (folder / "broken/text.mp4").write_text("this is not a video\n" * 100)
    kinds = [
        _failed("zero bytes", "broken/zero-bytes.mp4", "empty_file", "empty"),
        _failed("random bytes named .mp4", "broken/random-bytes.mp4", "unreadable", "not a video"),
        _failed("text named .mp4", "broken/text.mp4", "unreadable", "not a video"),
    ]
    at_end = make_video(outside / "source-moov-at-end.mp4", VideoSpec(**{**SMALL, "seconds": 2.0}))
    first = make_video(outside / "source-faststart.mp4", VideoSpec(**{**SMALL, "seconds": 2.0, "faststart": True}))
    moov, mdat = _atom(at_end, b"moov"), _atom(at_end, b"mdat")
    cuts = [  # (name, source, bytes kept, code, cause)
        ("cut after 8 bytes", at_end, 8, "unreadable", "not a video"),
        ("cut inside the data, index at the end (never written)", at_end, mdat[0] + mdat[1] // 2, "unreadable",
         "truncated"),
        ("cut inside the index at the end (the video track whole, the audio track cut)", at_end,
         moov[0] + moov[1] // 2, "decode_failed", "truncated"),
        ("cut inside the index at the start", first, _atom(first, b"moov")[0] + 100, "decode_failed", "truncated"),
    ]
    data_start, data_size = _atom(first, b"mdat")
    for percent in (30, 70, 95):
        cuts.append((f"cut at {percent}% of the data, index at the start", first,
                     data_start + data_size * percent // 100, "decode_failed", "truncated"))
    for index, (name, source, keep, code, cause) in enumerate(cuts):
        path = f"broken/cut-{index}.mp4"
        (folder / path).write_bytes(source.read_bytes()[:keep])
        kinds.append(_failed(name, path, code, cause))
    path = "broken/zeroed-frames.mp4"
    _zero_middle(make_video(outside / "source-zeroed.mp4", VideoSpec(**{**SMALL, "seconds": 2.0, "faststart": True,
                                                                          "audio": False})), folder / path)
    kinds.append(_failed("frame data overwritten with zeros", path, "decode_failed", "decod"))
    path = _clip(folder, "broken/directory.mp4/inner.mp4")
    kinds.append(_ok("a directory named like a video (walked, not read)", path))
    return kinds


# --- names --------------------------------------------------------------------------------------

def _names(folder: Path, outside: Path) -> list[Kind]:
    (folder / "names").mkdir(parents=True, exist_ok=True)
    kinds = []
    raw = os.fsencode(folder / "names") + b"/latin1-caf\xe9.mp4"
    make_video(os.fsdecode(raw), VideoSpec(**SMALL))
    kinds.append(Kind("file name not valid UTF-8", (os.fsdecode(b"names/latin1-caf\xe9.mp4"),), FAILED,
                      ids=("names/latin1-caf\\xe9",), code="bad_file_name", cause="not valid utf-8",
                      note="the id shows the undecodable byte as \\xe9"))
    longest = "names/" + "x" * 251 + ".mp4"  # 255 bytes: the longest name ext4 and most file systems take
    kinds.append(_ok("255-byte file name", _clip(folder, longest)))
    wide = "names/" + "é" * 125 + ".mp4"  # 254 bytes in UTF-8, 129 characters
    kinds.append(_ok("254-byte name of 2-byte characters", _clip(folder, wide)))
    deep = "names/" + "/".join(["d" * 200] * 12) + "/deep.mp4"  # a 2.4 KB path
    kinds.append(_ok("2.4 KB path, 12 folders deep", _clip(folder, deep)))
    odd = "names/spaces, 'quotes', \"double\", new\nline, tab\t.mp4"
    kinds.append(_ok("spaces, quotes, newline and tab in the name", _clip(folder, odd)))
    _clip(folder, "names/.hidden.mp4")
    kinds.append(Kind("hidden file", ("names/.hidden.mp4",), SKIPPED, ids=("names/.hidden",), note="hidden entries are never read"))
    return kinds


# --- links and special files --------------------------------------------------------------------

def _links(folder: Path, outside: Path) -> list[Kind]:
    links = folder / "links"
    links.mkdir(parents=True, exist_ok=True)
    kinds = []
    os.symlink("../codecs/h264.mp4", links / "alias.mp4")
    kinds.append(_ok("link to a video inside the folder", "links/alias.mp4", codec="h264"))
    target = _clip(folder, "inside/clip.mp4")
    os.symlink("../inside", links / "dir-alias")
    kinds.append(Kind("link to a folder inside the folder", ("links/dir-alias", target), OK,
                      ids=("links/dir-alias/clip", video_id(target)), audio=True))
    make_video(outside / "target.mp4", VideoSpec(**SMALL))
    make_video(outside / "folder/in-linked-folder.mp4", VideoSpec(**SMALL))
    os.symlink(outside / "target.mp4", links / "outside.mp4")
    kinds.append(Kind("link to a video outside the folder", ("links/outside.mp4",), SKIPPED,
                      ids=("links/outside",), cause="outside"))
    os.symlink(os.path.relpath(outside / "folder", links), links / "outside-dir")
    kinds.append(Kind("link to a folder outside the folder", ("links/outside-dir",), SKIPPED,
                      ids=("links/outside-dir/in-linked-folder",), cause="outside"))
    os.symlink("..", links / "loop")
    kinds.append(Kind("link to the folder holding it (a loop)", ("links/loop",), SKIPPED,
                      ids=("links/loop/links/alias",), cause="loop"))
    os.symlink("missing.mp4", links / "broken.mp4")
    kinds.append(Kind("link to nothing", ("links/broken.mp4",), SKIPPED, ids=("links/broken",), cause="nothing"))
    os.symlink("self.mp4", links / "self.mp4")
    kinds.append(Kind("link to itself", ("links/self.mp4",), SKIPPED, ids=("links/self",), cause="cannot resolve"))
    return kinds


def _special(folder: Path, outside: Path) -> list[Kind]:
    (folder / "special").mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "special/fifo.mp4")
    kinds = [Kind("named pipe with a video name (opening it would block)", ("special/fifo.mp4",), SKIPPED,
                  ids=("special/fifo",), cause="not a regular file")]
    path = _clip(folder, "special/unreadable.mp4")
    os.chmod(folder / path, 0)
    kinds.append(_failed("no read permission", path, "unreadable", "permission denied", unprivileged=True))
    path = _clip(folder, "special/locked/clip.mp4")
    os.chmod(folder / "special/locked", 0)
    kinds.append(Kind("folder without permission to list it", (path,), SKIPPED, ids=(video_id(path),),
                      cause="permission denied", unprivileged=True))
    return kinds


# --- writing odd files --------------------------------------------------------------------------

def _encode(path: Path, codec: str, width: int, height: int, *, rate: int, pts, empty_audio: bool = False,
            options: dict | None = None) -> None:
    """Flat frames at the given timestamps (a gap is a dropped frame); optionally an audio stream
    that never receives a sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=48000) if empty_audio else None
        picture = np.zeros((height, width, 3), np.uint8)
        for index, timestamp in enumerate(pts):
            picture[:] = (index * 30) % 256
            picture[: height // 2, : width // 2] = 255 - picture[0, 0]
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = timestamp, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio is not None:
            container.mux(audio.encode(None))


def write_audio_only(path: Path) -> None:
    """One second of silent AAC in an MP4 with no video stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _atom(path: Path, kind: bytes) -> tuple[int, int]:
    """(offset, size) of a top-level MP4 atom."""
    data = path.read_bytes()
    offset = 0
    while offset + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[offset : offset + 8])
        if name == kind:
            return offset, size
        offset += size
    raise ValueError(f"{path} has no {kind!r} atom")


def _zero_middle(source: Path, target: Path) -> None:
    """Overwrite the middle third of the frame data with zeros (frames the index still promises)."""
    data = bytearray(source.read_bytes())
    start, size = _atom(source, b"mdat")
    begin, end = start + 8 + size // 3, start + 8 + 2 * size // 3
    data[begin:end] = bytes(end - begin)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(data))


def cut_with_stream_copy(source: Path, target: Path, start: float) -> Path:
    """What `ffmpeg -ss START -i source -c copy target` writes, made with PyAV (no ffmpeg binary here).

    Without re-encoding a clip can only begin at a keyframe, so every packet from the last video
    keyframe at or before START on is copied, video and audio, with its timestamps moved back by START:
    the packets before the cut get negative ones, and the MP4 muxer writes an edit list that starts
    playback at START. Players, and FFmpeg's decoder, do not show the frames before it; the
    container's frame count includes them.
    """
    with av.open(str(source)) as container:
        video = container.streams.video[0]
        keyframe = max(packet.pts for packet in container.demux(video)
                       if packet.size and packet.is_keyframe and packet.pts * video.time_base <= start)
    begin = keyframe * video.time_base  # seconds
    target.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(source)) as container, av.open(str(target), "w") as output:
        copies = {stream.index: output.add_stream_from_template(stream)
                  for stream in container.streams if stream.type in ("video", "audio")}
        started = False
        for packet in container.demux():
            if not packet.size or packet.stream.index not in copies:
                continue
            time_base = packet.stream.time_base
            if packet.stream.type == "video":
                started = started or packet.pts == keyframe  # from the keyframe on, in decode order
                if not started:
                    continue
            elif (packet.pts + packet.duration) * time_base <= begin:
                continue  # audio that ends before the keyframe
            shift = round(start / time_base)
            packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
            packet.stream = copies[packet.stream.index]
            output.mux(packet)
    return target


def end_edit_early(source: Path, target: Path, seconds: float) -> Path:
    """`source` with its video track's edit (the first `elst` box, one entry) made `seconds` shorter: what
    a clip cut with an end as well (`-t`) may hold, frames past the edit's end that players do not show."""
    data = bytearray(source.read_bytes())
    header = data.index(b"mvhd")
    timescale_at = header + 8 + (16 if data[header + 4] == 1 else 8)  # after version, flags and two times
    timescale = struct.unpack(">I", data[timescale_at : timescale_at + 4])[0]
    edits = data.index(b"elst")
    wide = data[edits + 4] == 1
    if struct.unpack(">I", data[edits + 8 : edits + 12])[0] != 1:
        raise ValueError(f"{source}: the first edit list holds more than one edit")
    field = ">Q" if wide else ">I"
    at, size = edits + 12, 8 if wide else 4
    duration = struct.unpack(field, data[at : at + size])[0]
    data[at : at + size] = struct.pack(field, duration - round(seconds * timescale))
    target.write_bytes(bytes(data))
    return target
