"""Keyframe timelines: how K keyframes become one continuous sequence of frames.

Joining rule (used by every transition node of this pack): a story of K keyframes gives K-1 transitions
of ``frames_per_transition`` = L frames each, both endpoints included. Consecutive transitions SHARE their
boundary frame (the end of transition k is the start of transition k+1), so the whole video has
``(K - 1) * (L - 1) + 1`` frames, keyframe k sits exactly at frame ``k * (L - 1)``, and no frame is shown
twice. This matches the paper's SMP setting (arXiv 2405.01434, Sec. 3.2: K_s..K_e interpolated to L
frames) applied pairwise over consecutive story images.

Interpolation works on any tensor whose first dim is the keyframe axis: ``(K, *feature)``. ``slerp`` is
spherical interpolation along the LAST dim (per token for token sets such as CLIP hidden states or text
tokens, per vector for pooled embeddings); norms are interpolated linearly so magnitudes stay between
the two endpoints. Endpoints are reproduced exactly (t = 0 and t = 1 copy the keyframe).
"""
from __future__ import annotations

import torch

INTERPOLATIONS = ("linear", "slerp")


def total_frames(num_keyframes: int, frames_per_transition: int) -> int:
    """Frames of the joined video: ``(K - 1) * (L - 1) + 1``. Needs K >= 2 and L >= 2."""
    if num_keyframes < 2 or frames_per_transition < 2:
        raise ValueError("need at least 2 keyframes and 2 frames per transition")
    return (num_keyframes - 1) * (frames_per_transition - 1) + 1


def keyframe_positions(num_keyframes: int, frames_per_transition: int) -> list[int]:
    """Frame index of each keyframe in the joined video: ``k * (L - 1)``."""
    return [k * (frames_per_transition - 1) for k in range(num_keyframes)]


def segment_weights(frames_per_transition: int, dtype=torch.float32) -> torch.Tensor:
    """``t`` of the L frames of one transition: ``linspace(0, 1, L)`` (float, shape (L,))."""
    return torch.linspace(0.0, 1.0, frames_per_transition, dtype=dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation along the last dim, norms interpolated linearly.

    a, b: (..., C) same shape. t: (L,) in [0, 1]. Returns (L, ..., C) in float32 (caller casts).
    Nearly parallel (or zero) vectors fall back to linear interpolation, which is the limit of slerp.
    """
    a32, b32 = a.float(), b.float()
    na = a32.norm(dim=-1, keepdim=True)
    nb = b32.norm(dim=-1, keepdim=True)
    ua = a32 / na.clamp_min(eps)
    ub = b32 / nb.clamp_min(eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    tt = t.float().view(-1, *([1] * a.ndim))
    safe = so.abs() > 1e-4
    so_safe = torch.where(safe, so, torch.ones_like(so))
    wa = torch.where(safe, torch.sin((1 - tt) * omega) / so_safe, 1 - tt)
    wb = torch.where(safe, torch.sin(tt * omega) / so_safe, tt)
    direction = wa * ua + wb * ub
    norm = (1 - tt) * na + tt * nb
    # direction is unit length for the slerp branch; for the linear fallback renormalise as well.
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    out = direction * norm
    # exact endpoints (acos/sin round-off otherwise leaves ~1e-7 differences)
    out = torch.where(tt == 0, a32.unsqueeze(0).expand_as(out), out)
    out = torch.where(tt == 1, b32.unsqueeze(0).expand_as(out), out)
    return out


def interpolate_pair(a: torch.Tensor, b: torch.Tensor, num_frames: int, mode: str = "linear") -> torch.Tensor:
    """L frames from ``a`` (t=0) to ``b`` (t=1): (L, *a.shape), dtype of ``a``.

    mode: "linear" (lerp) or "slerp" (see :func:`slerp`). Raises ValueError on an unknown mode or a shape
    mismatch.
    """
    if a.shape != b.shape:
        raise ValueError(f"keyframe shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    t = segment_weights(num_frames)
    if mode == "linear":
        tt = t.view(-1, *([1] * a.ndim))
        out = (1 - tt) * a.float().unsqueeze(0) + tt * b.float().unsqueeze(0)
        out[0], out[-1] = a.float(), b.float()
    elif mode == "slerp":
        out = slerp(a, b, t)
    else:
        raise ValueError(f"unknown interpolation '{mode}', expected one of {INTERPOLATIONS}")
    return out.to(a.dtype)


def join_transitions(segments: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-transition frame tensors (each (L, ...)) sharing boundary frames.

    Segment k+1's first frame is dropped (it equals segment k's last). Returns ((K-1)*(L-1)+1, ...).
    """
    parts = [segments[0]] + [s[1:] for s in segments[1:]]
    return torch.cat(parts, dim=0)


def interpolate_keyframes(keys: torch.Tensor, frames_per_transition: int, mode: str = "linear") -> torch.Tensor:
    """Per-frame tensor for a whole keyframe sequence ``keys`` (K, *feature) -> (total_frames, *feature).

    Uses :func:`interpolate_pair` for each consecutive pair and :func:`join_transitions`.
    """
    segments = [interpolate_pair(keys[k], keys[k + 1], frames_per_transition, mode)
                for k in range(keys.shape[0] - 1)]
    return join_transitions(segments)
