"""Absolute frame (image) index of each row of one model call, under every context-window layout.

Samplers that slice a long latent batch into windows tell attention patches which frames a call holds through
``transformer_options`` (``extra_options`` in a patch):

- AnimateDiff-Evolved: ``ad_params["sub_idxs"]``, the window's frames (None when the call holds the whole
  video), and ``ad_params["full_length"]``, the video length.
- core ComfyUI (``comfy/context_windows.py``): ``context_window.index_list``. Since ComfyUI 0.33
  (``causal_window_fix``, on by default) every window after the first also carries ``causal_anchor_index``
  (>= 0: the absolute frame put IN FRONT of the window's rows), so the call has ``len(index_list) + 1`` rows;
  ``total_frames`` is the video length there (0 or absent on older versions).

Used by CSA (which images of a window are references) and the IP-Adapter injection (which embedding each
frame reads), so both follow one rule.
"""
from __future__ import annotations

from ..errors import StoryDiffusionError


class FrameLayoutError(StoryDiffusionError, ValueError):
    """A context window does not describe the rows of the model call it came with."""


def window_frames(extra_options: dict, batch: int, node: str) -> list[int] | None:
    """Absolute frame index of each of the ``batch`` rows of one cond/uncond chunk, or None when no context
    window sliced the batch (row i is frame i).

    AnimateDiff-Evolved's ``ad_params`` take precedence over a core ``context_window``. Raises FrameLayoutError
    (its message starts with ``node``, the node whose patch asks) when the window lists another number of
    frames than the call has rows: a layout this pack does not know.
    """
    ad = extra_options.get("ad_params")
    if isinstance(ad, dict) and ad.get("sub_idxs") is not None:
        frames = [int(i) for i in ad["sub_idxs"]]
    else:
        window = extra_options.get("context_window")
        if window is None:
            return None
        frames = [int(i) for i in window.index_list]
        anchor = getattr(window, "causal_anchor_index", None)
        if anchor is not None and anchor >= 0:
            frames.insert(0, int(anchor))
    if len(frames) != batch:
        raise FrameLayoutError(
            f"{node}: a context window lists {len(frames)} frames ({_short(frames)}) but its model call has "
            f"{batch} latent rows per cond/uncond chunk: an unknown context-window layout (known: "
            f"AnimateDiff-Evolved sub_idxs, ComfyUI context windows with or without a causal anchor frame)")
    return frames


def video_length(extra_options: dict) -> int | None:
    """Frames of the whole video when a context window says so (ADE ``full_length``, core ``total_frames``)."""
    ad = extra_options.get("ad_params")
    if isinstance(ad, dict) and ad.get("full_length") is not None:
        return int(ad["full_length"])
    total = getattr(extra_options.get("context_window"), "total_frames", 0)
    return int(total) if total else None


def _short(frames: list[int]) -> str:
    return str(frames) if len(frames) <= 8 else f"[{frames[0]}, {frames[1]}, ..., {frames[-1]}]"
