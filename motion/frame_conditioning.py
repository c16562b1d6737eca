"""Per-frame text conditionings between keyframe prompts (the format AnimateDiff-Evolved consumes).

Output: ONE conditioning entry ``[[cond, extras]]`` with ``cond.shape == (frames, tokens, C)`` and, when
every keyframe carries one, ``extras["pooled_output"]`` of shape ``(frames, C_pooled)`` (SDXL: 1280).
Frames follow :mod:`motion.keyframes` (consecutive transitions share their boundary frame).

Token lengths: keyframes encoded from prompts of different lengths (77 vs 154 tokens: CLIP's 77-token
chunks) are brought to the least common multiple of their lengths by REPEATING each keyframe's whole
token sequence (77 -> 154 = the 77 tokens twice). Cross-attention over a sequence repeated n times gives
exactly the same output as over the sequence once (each key/value appears n times, softmax weights are
divided by n and summed back), so every keyframe still means what its prompt meant; this is also how
ComfyUI batches conds of different lengths. Zero-padding would not be neutral (zero keys take softmax
mass), and repeating only the padding token would change the attention weights.
"""
from __future__ import annotations

import math

import torch

from . import keyframes as kf


def _lcm(values):
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def repeat_to_length(cond: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the token sequence of ``cond`` (B, T, C) to ``length`` tokens; ``length % T == 0``."""
    t = cond.shape[1]
    if length % t:
        raise ValueError(f"{length} is not a multiple of {t}")
    return cond.repeat(1, length // t, 1)


def collect_keyframes(conditionings: list, node: str = "SDN_ConditioningTransition",
                      names: tuple[str, ...] = ("keyframes", "end")):
    """Turn one or more CONDITIONINGs into keyframe tensors.

    Each CONDITIONING must hold exactly one entry (several entries, as made by ConditioningCombine, apply
    to every frame and cannot be a keyframe sequence). Rows of dim 0 of every entry become keyframes, in
    input order. Returns ``(cond (K, T, C), pooled (K, P) or None, extras of the first entry)``; token
    lengths are unified with :func:`repeat_to_length` to their least common multiple.
    Raises NodeInputError for several entries, mismatching channel widths, or pooled_output present on
    some keyframes only.
    """
    from ..errors import NodeInputError

    conds, pooled, first_extras = [], [], None
    for name, c in zip(names, conditionings):
        if c is None:
            continue
        if not isinstance(c, list) or len(c) != 1:
            raise NodeInputError(node, name, "a CONDITIONING with exactly one entry (dim 0 = keyframes); "
                                 "ConditioningCombine output applies to every frame and is not a keyframe list",
                                 got=f"{len(c) if isinstance(c, list) else type(c).__name__} entries")
        tensor, extras = c[0][0], c[0][1]
        if first_extras is None:
            first_extras = extras
        conds.append((name, tensor))
        pooled.append((name, extras.get("pooled_output")))
    widths = {t.shape[-1] for _, t in conds}
    if len(widths) != 1:
        raise NodeInputError(node, names[-1], "conditionings from the same text encoder (same channel width)",
                             got=f"widths {sorted(widths)}")
    length = _lcm([t.shape[1] for _, t in conds])
    cond = torch.cat([repeat_to_length(t, length) for _, t in conds], dim=0)
    have = [p is not None for _, p in pooled]
    if any(have) and not all(have):
        missing = [n for n, p in pooled if p is None]
        raise NodeInputError(node, missing[0], "pooled_output on every keyframe conditioning (SDXL) or on none",
                             got="a conditioning without pooled_output")
    pooled_t = None
    if all(have):
        rows = []
        for (name, p), (_, t) in zip(pooled, conds):
            if p.shape[0] != t.shape[0]:
                # a single pooled vector for a multi-row cond: the same pooled for every row
                p = p[:1].expand(t.shape[0], -1)
            rows.append(p)
        pooled_t = torch.cat(rows, dim=0)
    return cond, pooled_t, dict(first_extras or {})


def conditioning_transition(conditionings: list, frames_per_transition: int, interpolation: str = "linear",
                            node: str = "SDN_ConditioningTransition") -> tuple[list, int]:
    """Per-frame CONDITIONING through every keyframe.

    conditionings: list of CONDITIONING (None allowed) whose rows are concatenated into K keyframes.
    Returns ``([[cond (F, T, C), extras]], F)`` with F = (K-1)*(L-1)+1. extras keeps the first entry's
    non-tensor values, plus ``pooled_output`` (F, P) when keyframes have one; other tensor extras (e.g.
    masks sized for one prompt) are dropped because they are not per-frame.
    """
    from ..errors import NodeInputError

    cond, pooled, extras = collect_keyframes(conditionings, node=node)
    if cond.shape[0] < 2:
        raise NodeInputError(node, "keyframes", "at least 2 keyframes: one entry with dim 0 >= 2 "
                             "(e.g. SDN_StoryPrompt), or 'keyframes' plus 'end'", got=f"{cond.shape[0]} keyframe")
    frames = kf.interpolate_keyframes(cond, frames_per_transition, interpolation)
    out_extras = {k: v for k, v in extras.items() if not isinstance(v, torch.Tensor)}
    if pooled is not None:
        out_extras["pooled_output"] = kf.interpolate_keyframes(pooled, frames_per_transition, interpolation)
    return [[frames, out_extras]], frames.shape[0]
