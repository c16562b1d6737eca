"""Keyframe timelines: how K keyframes become one continuous sequence of frames.

Joining rule (used by every transition node of this pack): a story of K keyframes gives K-1 transitions
of ``frames_per_transition`` = L frames each, both endpoints included. Consecutive transitions SHARE their
boundary frame (the end of transition k is the start of transition k+1), so the whole video has
``(K - 1) * (L - 1) + 1`` frames, keyframe k sits exactly at frame ``k * (L - 1)``, and no frame is shown
twice. This matches the paper's SMP setting (arXiv 2405.01434, Sec. 3.2: K_s..K_e interpolated to L
frames) applied pairwise over consecutive story images.

Interpolation (``motion.predictor.interpolate``): ``linear`` or ``slerp``, spherical along the LAST dim (per
token for token sets such as CLIP hidden states or text tokens, per vector for pooled embeddings) with
norms interpolated linearly. Endpoints are reproduced exactly (t = 0 and t = 1 copy the keyframe).
"""
from __future__ import annotations

import torch


def join_transitions(segments: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-transition frame tensors (each (L, ...)) sharing boundary frames.

    Segment k+1's first frame is dropped (it equals segment k's last). Returns ((K-1)*(L-1)+1, ...).
    """
    parts = [segments[0]] + [s[1:] for s in segments[1:]]
    return torch.cat(parts, dim=0)


def interpolate_keyframes(keys: torch.Tensor, frames_per_transition: int, mode: str = "linear") -> torch.Tensor:
    """Per-frame tensor for a whole keyframe sequence ``keys`` (K, T, C) or (K, C) -> ((K-1)*(L-1)+1, ...).

    Every consecutive pair goes through ``motion.predictor.interpolate`` (the same interpolation the motion
    predictor starts from, so text and image conditionings move together), then :func:`join_transitions`.
    """
    from .predictor import interpolate

    flat = keys.ndim == 2
    k3 = keys.unsqueeze(1) if flat else keys
    seg = interpolate(k3[:-1], k3[1:], frames_per_transition, mode)  # (K-1, L, T, C)
    out = join_transitions(list(seg.unbind(0)))
    return out[:, 0] if flat else out
