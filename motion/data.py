"""Training data for the motion predictor: real videos -> shots -> CLIP vision tokens per frame -> clips.

Pipeline (one pass per video, cached on disk, then random clips):
1. ``iter_frames``: decode with PyAV, every ``frame_stride``-th frame, scaled so the short side is
   ``short_side`` px (the CLIP preprocessing resizes to 224 and centre-crops anyway).
2. ``split_shots``: hard cuts break a clip's motion (start and end keyframes of different scenes), so frames are
   split into shots where consecutive 16x16 thumbnails differ by more than ``cut_threshold`` (mean absolute
   difference in [0, 1]) AND by more than ``cut_ratio`` x the median difference of the video.
3. ``encode_frames``: ComfyUI's own CLIP vision model (``ClipVisionModel.encode_image``, the code path of the
   core CLIPVisionEncode node) gives ``penultimate_hidden_states`` (B, 257, 1280 for ViT-H) or ``image_embeds``
   (B, 1024) per frame. Stored as float16 safetensors, one file per video (``VideoEncodingCache``), so training
   memory does not grow with the data set: clips read only their L frames.
4. ``ClipSampler.sample``: a shot, a span (``min_span..max_span`` decoded frames), a start; L frames evenly spaced
   from start to start + span (frame 0 and L-1 are the keyframes).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".gif")
TOKEN_KINDS = {"penultimate_hidden_states": "penultimate_hidden_states", "penultimate": "penultimate_hidden_states",
               "image_embeds": "image_embeds", "pooled": "image_embeds"}
CACHE_VERSION = "1"


class VideoDataError(ValueError):
    """No usable video data (no files, unreadable file, no shot long enough for a clip)."""


def list_videos(root) -> list[Path]:
    """Video files under ``root`` (a file or a folder, searched recursively), sorted for reproducibility."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise VideoDataError(f"video folder '{root}' does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def iter_frames(path, short_side: int = 224, frame_stride: int = 1, max_frames: int | None = None):
    """Yield decoded RGB frames of ``path`` as uint8 tensors ``(H, W, 3)`` (PyAV; first video stream).

    Every ``frame_stride``-th frame, scaled so that min(H, W) == ``short_side`` (aspect kept, even sizes),
    at most ``max_frames`` frames. Raises ``VideoDataError`` if the file cannot be opened/decoded.
    """
    import av

    try:
        container = av.open(str(path))
    except Exception as e:
        raise VideoDataError(f"cannot open video '{path}': {e}") from e
    try:
        if not container.streams.video:
            raise VideoDataError(f"'{path}' has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        kept = 0
        for i, frame in enumerate(container.decode(stream)):
            if i % frame_stride:
                continue
            scale = short_side / min(frame.width, frame.height)
            w = max(2, int(round(frame.width * scale / 2)) * 2)
            h = max(2, int(round(frame.height * scale / 2)) * 2)
            yield torch.from_numpy(frame.reformat(width=w, height=h, format="rgb24").to_ndarray())
            kept += 1
            if max_frames is not None and kept >= max_frames:
                break
    except av.error.FFmpegError as e:
        raise VideoDataError(f"cannot decode video '{path}': {e}") from e
    finally:
        container.close()


def thumbnail(frame_u8: torch.Tensor, size: int = 16) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [0, 1] (area average), for cut detection."""
    step = max(1, min(frame_u8.shape[0], frame_u8.shape[1]) // (4 * size))  # subsample first: cheap
    x = frame_u8[::step, ::step].permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(x, size)[0]


def split_shots(thumbs: torch.Tensor, cut_threshold: float = 0.12, cut_ratio: float = 4.0,
                min_shot: int = 2) -> list[tuple[int, int]]:
    """Split a video into shots from frame thumbnails ``(N, 3, s, s)``; returns ``[(start, end_exclusive), ...]``.

    A cut is between frames i-1 and i when their mean absolute difference exceeds both ``cut_threshold`` and
    ``cut_ratio`` x the video's median difference (so fast but continuous motion is not cut). Shots shorter than
    ``min_shot`` frames are dropped.
    """
    n = thumbs.shape[0]
    if n == 0:
        return []
    if n == 1:
        return [(0, 1)] if min_shot <= 1 else []
    d = (thumbs[1:] - thumbs[:-1]).abs().mean(dim=(1, 2, 3))
    limit = max(cut_threshold, cut_ratio * float(d.median()))
    cuts = [i + 1 for i in range(n - 1) if float(d[i]) > limit]
    bounds = [0, *cuts, n]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= min_shot]


def encode_frames(clip_vision, frames_u8: torch.Tensor, token_kind: str, crop: bool = True) -> torch.Tensor:
    """Encode uint8 frames ``(B, H, W, 3)`` with a ComfyUI ``ClipVisionModel`` -> float16 ``(B, T, C)`` on CPU.

    ``token_kind``: ``"penultimate_hidden_states"`` -> ``(B, T, C)``; ``"image_embeds"`` -> ``(B, 1, C)``.
    Runs without autograd; the result is a fresh normal tensor (not an inference tensor), safe for training.
    """
    kind = TOKEN_KINDS[token_kind]
    with torch.inference_mode():
        out = clip_vision.encode_image(frames_u8.float() / 255.0, crop=crop)
        x = out[kind]
        if kind == "image_embeds":
            x = x.unsqueeze(1)
        x = x.to("cpu", torch.float16)
    return x.clone()  # outside inference_mode: a normal tensor autograd may use


def file_digest(path, chunk: int = 1 << 20) -> str:
    """A cheap identity for a (possibly multi-GB) file: size + first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


@dataclass
class EncodeSettings:
    token_kind: str = "penultimate_hidden_states"
    short_side: int = 224
    frame_stride: int = 1
    max_frames_per_video: int | None = 600
    crop: bool = True
    cut_threshold: float = 0.12
    cut_ratio: float = 4.0
    batch_size: int = 16

    def key(self, video: Path, encoder_id: str) -> str:
        st = video.stat()
        payload = json.dumps([CACHE_VERSION, str(video.resolve()), st.st_size, int(st.st_mtime), encoder_id,
                              TOKEN_KINDS[self.token_kind], self.short_side, self.frame_stride,
                              self.max_frames_per_video, self.crop, self.cut_threshold, self.cut_ratio])
        return hashlib.sha1(payload.encode()).hexdigest()[:20]


class VideoEncodingCache:
    """One safetensors file per (video, encoder, settings) in ``root``: ``tokens`` (N, T, C) float16 + shots.

    ``ensure(video, clip_vision, encoder_id, settings)`` encodes a video unless its file exists and returns the
    file path. Files are written atomically, so an interrupted run re-encodes only the unfinished video.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, video: Path, encoder_id: str, settings: EncodeSettings) -> Path:
        return self.root / f"{video.stem[:40]}-{settings.key(video, encoder_id)}.safetensors"

    def ensure(self, video: Path, clip_vision, encoder_id: str, settings: EncodeSettings,
               interrupt=None) -> Path:
        from safetensors.torch import save_file

        path = self.path_for(video, encoder_id, settings)
        if path.is_file():
            return path
        chunks, thumbs, pending = [], [], []

        def flush():
            if pending:
                chunks.append(encode_frames(clip_vision, torch.stack(pending), settings.token_kind, settings.crop))
                pending.clear()

        for frame in iter_frames(video, settings.short_side, settings.frame_stride, settings.max_frames_per_video):
            thumbs.append(thumbnail(frame))
            pending.append(frame)
            if len(pending) >= settings.batch_size:
                flush()
                if interrupt is not None:
                    interrupt()
        flush()
        if not chunks:
            raise VideoDataError(f"video '{video}' has no decodable frames")
        shots = split_shots(torch.stack(thumbs), settings.cut_threshold, settings.cut_ratio)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"tokens": torch.cat(chunks).contiguous()}, str(tmp),
                  metadata={"source": str(video), "shots": json.dumps(shots), "cache_version": CACHE_VERSION})
        os.replace(tmp, path)
        return path


class EncodedVideo:
    """A cached video encoding: ``len()`` frames, ``shots``, and ``frames(indices)`` -> float32 (L, T, C)."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            meta = f.metadata() or {}
            sl = f.get_slice("tokens")
            self.shape = tuple(sl.get_shape())
        self.shots = [tuple(s) for s in json.loads(meta.get("shots", "[]"))]
        self.source = meta.get("source", self.path)

    def __len__(self):
        return self.shape[0]

    def frames(self, indices) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            sl = f.get_slice("tokens")
            return torch.cat([sl[int(i):int(i) + 1] for i in indices]).float()


class ClipSampler:
    """Draw training clips of ``num_frames`` tokens-per-frame from encoded videos, within shots only.

    ``min_span``/``max_span``: distance in decoded frames between the start and end keyframe (default
    ``num_frames - 1`` and ``3 * (num_frames - 1)``). Shots are drawn with probability proportional to the
    number of clips they hold. ``sample(batch, generator)`` -> float32 ``(B, L, T, C)``.
    """

    def __init__(self, videos: list[EncodedVideo], num_frames: int, min_span: int | None = None,
                 max_span: int | None = None):
        if num_frames < 3:
            raise VideoDataError(f"clips need at least 3 frames (start, one intermediate, end), got {num_frames}")
        self.videos, self.num_frames = videos, num_frames
        self.min_span = max(1, min_span if min_span is not None else num_frames - 1)
        self.max_span = max(self.min_span, max_span if max_span is not None else 3 * (num_frames - 1))
        self.shots = []  # (video index, start, end_exclusive, clips it holds)
        for vi, v in enumerate(videos):
            for a, b in v.shots:
                length = b - a
                if length - 1 >= self.min_span:
                    spans = range(self.min_span, min(self.max_span, length - 1) + 1)
                    self.shots.append((vi, a, b, sum(length - s for s in spans)))
        if not self.shots:
            longest = max((b - a for v in videos for a, b in v.shots), default=0)
            raise VideoDataError(
                f"no shot is long enough for a clip spanning {self.min_span + 1} decoded frames (longest shot: "
                f"{longest} frames). Lower --frames/--min-span/--frame-stride or add longer videos.")
        self.weights = torch.tensor([s[3] for s in self.shots], dtype=torch.float64)

    def draw_indices(self, generator: torch.Generator) -> tuple[int, list[int]]:
        si = int(torch.multinomial(self.weights, 1, generator=generator))
        vi, a, b, _ = self.shots[si]
        hi = min(self.max_span, b - a - 1)
        span = int(torch.randint(self.min_span, hi + 1, (1,), generator=generator))
        start = a + int(torch.randint(0, b - a - span, (1,), generator=generator))
        idx = torch.linspace(start, start + span, self.num_frames, dtype=torch.float64).round().long().tolist()
        return vi, idx

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        clips = []
        for _ in range(batch):
            vi, idx = self.draw_indices(generator)
            clips.append(self.videos[vi].frames(idx))
        return torch.stack(clips)
