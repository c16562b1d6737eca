"""Encode a parsed story into per-panel CONDITIONING with ComfyUI's CLIP API.

Hand-off format (the one AnimateDiff-Evolved / prompt-schedule packs use for per-frame prompts): ONE entry
``[[cond, extras]]`` with ``cond`` of shape ``(panels, tokens, dim)`` (float, the CLIP's intermediate device),
``tokens`` the same for every panel (a multiple of the tokenizer's chunk length, 77 for CLIP), and
``extras["pooled_output"]`` of shape ``(panels, pooled_dim)`` when the CLIP gives a pooled vector (SD1: 768,
SDXL: 1280). Panel ``i`` of the latent batch is conditioned on row ``i``.
"""
from __future__ import annotations

import logging

import torch

from ..errors import UnsupportedModelError
from .parser import Story
from .select import same_value
from .styles import style_negative


def _encode(clip, text: str) -> dict:
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)


def _pad_tokens(cond: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Append copies of ``empty`` (1, chunk, dim) to ``cond`` (1, L, dim) until it has ``length`` tokens."""
    missing = length - cond.shape[1]
    if missing == 0:
        return cond
    chunk = empty.shape[1]
    if missing % chunk:
        raise UnsupportedModelError(
            f"SDN_StoryPrompt: this text encoder gives prompt lengths ({cond.shape[1]} vs {length} tokens) that are not "
            f"whole chunks of its empty-prompt encoding ({chunk} tokens); per-panel padding needs a CLIP-style "
            "tokenizer (SD1.x, SD2.x, SDXL).")
    return torch.cat([cond, empty.to(cond).expand(1, chunk, -1).repeat(1, missing // chunk, 1)], dim=1)


def encode_panels(clip, prompts: list[str]) -> list:
    """Encode each prompt alone and stack them into one per-panel CONDITIONING entry.

    clip: a ComfyUI ``comfy.sd.CLIP``. prompts: one final (styled) prompt per panel, at least one.
    Returns ``[[cond (P, T, D), extras]]``. Prompts longer than one chunk give ``k`` chunks of 77 tokens from
    ComfyUI's tokenizer; shorter panels are padded at the end with the encoding of an EMPTY prompt chunk
    (start token, end token, padding), not zeros and not a repeat of their own chunk: an empty chunk is what the
    tokenizer itself puts around a short prompt, so the extra keys only add "nothing" tokens to cross-attention,
    while zeros are off-distribution keys and repeating a panel's own chunk would duplicate a 2-chunk panel's
    first half when padding to 3 chunks. Each panel is encoded on its own (never concatenated with other
    panels' tokens), so row i equals encoding prompt i alone, padded.

    Extras: ``pooled_output`` is stacked per panel (each panel's pooled vector comes from its own first chunk,
    as ComfyUI does); ``attention_mask`` (encoders that return one) is padded with the empty chunk's mask and
    stacked; any other key is kept only when identical for every panel, else dropped with a warning because
    its per-panel meaning is unknown to this node.
    """
    from comfy import model_management
    from comfy.utils import ProgressBar

    pbar = ProgressBar(len(prompts))
    encoded = []
    for text in prompts:
        model_management.throw_exception_if_processing_interrupted()
        encoded.append(_encode(clip, text))
        pbar.update(1)

    length = max(e["cond"].shape[1] for e in encoded)
    # the empty chunk costs a forward pass: only when some panel needs padding
    empty = _encode(clip, "") if any(e["cond"].shape[1] != length for e in encoded) else None
    cond = torch.cat([_pad_tokens(e["cond"], length, empty["cond"]) if empty is not None else e["cond"]
                      for e in encoded], dim=0)

    extras: dict = {}
    keys = [k for k in encoded[0] if k != "cond"]
    for key in keys:
        values = [e.get(key) for e in encoded]
        if key == "pooled_output":
            if all(isinstance(v, torch.Tensor) for v in values):
                extras[key] = torch.cat([v.reshape(1, -1) for v in values], dim=0)
            continue  # encoders without a pooled vector give None: leave it out
        if key == "attention_mask" and all(isinstance(v, torch.Tensor) for v in values) \
                and (empty is None or isinstance(empty.get(key), torch.Tensor)):
            masks = []
            for v, e in zip(values, encoded):
                parts = [v.reshape(1, -1)]
                if empty is not None:
                    reps = (length - e["cond"].shape[1]) // empty["cond"].shape[1]
                    parts += [empty[key].reshape(1, -1).to(v)] * reps
                masks.append(torch.cat(parts, dim=1))
            extras[key] = torch.cat(masks, dim=0)
            continue
        first = values[0]
        same = all(same_value(first, v) for v in values[1:])
        if same:
            extras[key] = first
        else:
            logging.warning("SDN_StoryPrompt: dropping conditioning extra '%s': it differs between panels and its "
                            "per-panel batch layout is unknown", key)
    return [[cond, extras]]


def encode_negative(clip, negative: str, style: str) -> list:
    """One CONDITIONING entry (batch 1) for ``negative`` plus the style's negatives; pooled kept when present."""
    out = _encode(clip, style_negative(style, negative))
    cond = out.pop("cond")
    extras = {k: v for k, v in out.items() if v is not None}
    return [[cond, extras]]


def encode_story(clip, story: Story, negative: str) -> tuple[list, list]:
    """(positive per-panel CONDITIONING, negative CONDITIONING) for ``story`` with its ``style``."""
    return encode_panels(clip, list(story.styled_prompts())), encode_negative(clip, negative, story.style)
