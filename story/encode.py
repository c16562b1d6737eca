"""Encode a parsed story into per-panel CONDITIONING with ComfyUI's tokenizer and text-encoder API.

Hand-off format (the one AnimateDiff-Evolved / prompt-schedule packs use for per-frame prompts): ONE entry
``[[cond, extras]]`` with ``cond`` of shape ``(panels, tokens, dim)`` (float, the CLIP's intermediate device),
``tokens`` the same for every panel, and every tensor the encoder returns besides ``cond`` (``pooled_output``
``(panels, pooled_dim)``, ``attention_mask`` ``(panels, tokens)``, HiDream's ``conditioning_llama3``...)
stacked the same way. Panel ``i`` of the latent batch is conditioned on row ``i``. Works for every text encoder
ComfyUI builds from ``SDTokenizer``-style tokenizers: CLIP (SD1.x, SD2.x, SDXL), CLIP-L + T5-XXL (Flux.1),
CLIP-L + CLIP-G + T5-XXL (SD3), T5 (Chroma), Mistral (Flux.2), Qwen2.5-VL (Qwen-Image), Qwen3 (Z-Image),
HiDream's four.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..errors import UnsupportedModelError
from .parser import Story
from .select import same_value
from .styles import STYLES, style_negative

NODE = "SDN_StoryPrompt"


def _tokenizer_of(clip, key: str):
    """The tokenizer that made the ``key`` token lists of ``clip.tokenize``: ComfyUI's tokenizer wrappers keep it
    as attribute ``key`` (Flux's ``t5xxl``, Qwen-Image's ``qwen25_7b``) or ``clip_<key>`` (``l``, ``g``)."""
    for name in (key, f"clip_{key}"):
        sub = getattr(clip.tokenizer, name, None)
        if all(hasattr(sub, a) for a in ("pad_token", "pad_left", "pad_to_max_length")):
            return sub
    raise UnsupportedModelError(
        f"{NODE}: the panels' prompts give '{key}' token lists of different lengths, and this text encoder's "
        f"tokenizer for them is not a ComfyUI SDTokenizer (no pad token or padding side to make them equal).")


def pad_panel_tokens(clip, tokens: list[dict]) -> tuple[list[dict], bool]:
    """Bring every panel's token lists to one length per encoder, by each tokenizer's own padding rule.

    tokens: one ``clip.tokenize(prompt)`` result per panel (``{encoder key: [chunk, ...]}``, a chunk being a list
    of ``(token, weight)``). New dicts; lists that are already equal for all panels are left alone.

    - Tokenizers with fixed chunks (``pad_to_max_length``: CLIP's 77-token chunks in SD1.x/SD2.x/SDXL and in
      Flux/SD3/HiDream): shorter panels get the tokenizer's EMPTY-prompt chunk appended (start, end, padding)
      until all have as many chunks as the longest. Each chunk is encoded on its own, so this adds the encoding
      of an empty chunk: "nothing" tokens, not zeros (off-distribution keys) and not a repeat of the panel's own
      chunk (that would duplicate half of a 2-chunk panel padded to 3). The pooled vector (first chunk) is
      unchanged.
    - Tokenizers without chunks that pad on the right (T5-XXL, Qwen, Llama, Gemma: one list per prompt): the
      shorter lists get the tokenizer's pad token, as its own ``min_length`` padding would, so row i is exactly
      what ComfyUI gives for prompt i with that minimum length raised to the longest panel's. The encoders that
      mask padding (attention masks from the pad token) mask these too; those that do not (Flux's T5 without
      mask) see them as ComfyUI's own 256-token padding is seen.
    - Tokenizers that pad on the LEFT (Flux.2's Mistral): the lists are left alone and ``left`` is True. Left pad
      tokens would move the prompt's tokens to later RoPE positions of the causal encoder, and Mistral's encoder
      does not mask its tokenizer's pad token (11; it masks 0), so the prompt would encode differently; the
      caller pads the encoder OUTPUT instead (:func:`encode_panels`).

    Returns ``(tokens, left)``. Raises UnsupportedModelError for a tokenizer that is not ComfyUI's
    ``SDTokenizer`` kind when lengths differ.
    """
    out = [dict(t) for t in tokens]
    empty = None
    left = False
    for key in tokens[0]:
        lists = [t[key] for t in tokens]
        shapes = [[len(chunk) for chunk in chunks] for chunks in lists]
        if all(s == shapes[0] for s in shapes):
            continue
        sub = _tokenizer_of(clip, key)
        if sub.pad_to_max_length:
            empty = clip.tokenize("") if empty is None else empty
            count = max(len(chunks) for chunks in lists)
            for panel, chunks in zip(out, lists):
                panel[key] = list(chunks) + [empty[key][0]] * (count - len(chunks))
            continue
        if any(len(chunks) != 1 for chunks in lists):
            raise UnsupportedModelError(f"{NODE}: the '{key}' tokenizer split a prompt into several chunks without "
                                        "padding them to a fixed length; panels of different lengths cannot be "
                                        "padded by its rules")
        if sub.pad_left:
            left = True
            continue
        length = max(len(chunks[0]) for chunks in lists)
        for panel, chunks in zip(out, lists):
            panel[key] = [list(chunks[0]) + [(sub.pad_token, 1.0)] * (length - len(chunks[0]))]
    return out, left


def _pad_front(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` (1, T, ...) with zeros in front of dim 1 up to ``length``."""
    return torch.cat([x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:])), x], dim=1)


def encode_panels(clip, prompts: list[str]) -> list:
    """Encode each prompt alone, padded to the longest panel by its tokenizers' rules, and stack the results
    into one per-panel CONDITIONING entry.

    clip: a ComfyUI ``comfy.sd.CLIP`` (any family above). prompts: one final (styled) prompt per panel, at least
    one. Returns ``[[cond (P, T, D), extras]]``: row i equals ``clip.encode_from_tokens`` of prompt i's tokens
    padded by :func:`pad_panel_tokens` (each panel is encoded on its own, never concatenated with other panels'
    tokens). For a left-padding tokenizer (Flux.2's Mistral) the prompts are encoded unpadded and the shorter
    rows of ``cond`` (and of ``attention_mask``) get zeros in front: the padding ComfyUI's Flux.2 model applies
    itself to text shorter than 512 tokens, so with every panel under 512 tokens the model sees exactly each
    prompt's own text at its own positions.

    Extras: a tensor of batch 1 from every panel (``pooled_output``, ``attention_mask``, ``conditioning_llama3``)
    is stacked along dim 0; an ``attention_mask`` a panel lacks (Qwen-Image drops one without masked tokens) is
    all ones. A key that is None for every panel stays None (``pooled_output`` of T5- or LLM-only encoders:
    Chroma's model reads the key). Other values are kept when equal for every panel, else dropped with a
    warning because their per-panel layout is unknown to this node. Raises UnsupportedModelError when an
    encoder still gives panels of different token lengths.
    """
    from comfy import model_management
    from comfy.utils import ProgressBar

    tokens, left = pad_panel_tokens(clip, [clip.tokenize(text) for text in prompts])
    pbar = ProgressBar(len(prompts))
    encoded = []
    for panel in tokens:
        model_management.throw_exception_if_processing_interrupted()
        encoded.append(clip.encode_from_tokens(panel, return_pooled=True, return_dict=True))
        pbar.update(1)
    if left:
        length = max(e["cond"].shape[1] for e in encoded)
        for e in encoded:
            for key in ("cond", "attention_mask"):
                if isinstance(e.get(key), torch.Tensor):
                    e[key] = _pad_front(e[key], length)

    shapes = {tuple(e["cond"].shape) for e in encoded}
    if len(shapes) > 1:
        raise UnsupportedModelError(f"{NODE}: this text encoder gives panels of different shapes {sorted(shapes)} "
                                    "even with their tokens padded to one length; it cannot condition one batch")
    cond = torch.cat([e["cond"] for e in encoded], dim=0)

    extras: dict = {}
    for key in dict.fromkeys(k for e in encoded for k in e if k != "cond"):
        values = [e.get(key) for e in encoded]
        if key == "attention_mask" and any(isinstance(v, torch.Tensor) for v in values):
            like = next(v for v in values if isinstance(v, torch.Tensor))
            values = [torch.ones_like(like) if v is None else v for v in values]
        if all(isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == 1 and v.shape == values[0].shape
               for v in values):
            extras[key] = torch.cat(values, dim=0)
        elif all(same_value(values[0], v) for v in values[1:]):
            extras[key] = values[0]
        else:
            logging.warning("%s: dropping conditioning extra '%s': it differs between panels and its per-panel "
                            "batch layout is unknown", NODE, key)
    return [[cond, extras]]


def encode_negative(clip, negative: str, style: str) -> list:
    """One CONDITIONING entry (batch 1) for ``negative`` plus the style's negatives, with every extra the encoder
    gives (as CLIPTextEncode: ``pooled_output`` stays even when None, since Flux-family models read the key)."""
    out = clip.encode_from_tokens(clip.tokenize(style_negative(style, negative)), return_pooled=True,
                                  return_dict=True)
    cond = out.pop("cond")
    return [[cond, out]]


# Token-axis layout of the cond per tokenizer key set: parts in token order, each the keys whose token lists give
# that part's positions (several keys: concatenated on channels, so they must agree). Only layouts where every
# cond position is one token of a list: LLM encoders (Qwen-Image, Z-Image, Lumina2, Flux.2, HiDream) add chat
# templates, drop or stack positions, and get no spans.
_LAYOUTS = {frozenset("l"): (("l",),), frozenset("h"): (("h",),), frozenset("g"): (("g",),),
            frozenset("gl"): (("l", "g"),), frozenset({"t5xxl"}): (("t5xxl",),),
            frozenset({"l", "t5xxl"}): (("t5xxl",),),  # Flux.1: CLIP-L gives the pooled vector only
            frozenset({"l", "g", "t5xxl"}): (("l", "g"), ("t5xxl",))}  # SD3: CLIP chunks, then T5 appended


def _content(chunks: list) -> list[tuple]:
    """``(token, position)`` of every text token (word id != 0: not start, end or padding) of one key's
    ``tokenize(..., return_word_ids=True)`` chunks; position = index in the chunks laid end to end."""
    out, offset = [], 0
    for chunk in chunks:
        out += [(item[0], offset + j) for j, item in enumerate(chunk) if item[2] != 0]
        offset += len(chunk)
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # textual-inversion embedding vectors
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _common(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and _same(a[n][0], b[n][0]):
        n += 1
    return n


def _ranges(positions: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted positions as contiguous ``(start, stop)`` runs."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return tuple(map(tuple, runs))


def _mention_positions(clip, key: str, text: str, full: list, start: int, stop: int) -> list[int]:
    """Positions of ``full`` (:func:`_content` of ``text``) holding ``text[start:stop]``: the tokens that the
    prefixes ``text[:start]`` and ``text[:stop]`` do not tokenize alike with ``text`` decide the edges, so a
    token that straddles an edge (a description glued to a word) counts as part of the description."""
    first = _common(_content(clip.tokenize(text[:start], return_word_ids=True)[key]), full)
    through = _content(clip.tokenize(text[:stop], return_word_ids=True)[key])
    last = _common(through, full)
    last += last < len(through)
    return [pos for _, pos in full[first:last]]


def story_spans(clip, story: Story, cond_length: int) -> tuple[dict, ...]:
    """Per panel, ``{name: ((start, stop), ...)}``: where each mention of a character's description lies on the
    token axis (dim 1) of the panel's row of :func:`encode_panels`' cond, for ``story``'s styled prompts.

    Follows the tokenizer's own token lists (``clip.tokenize(text, return_word_ids=True)``): a position is
    ``chunk index * chunk length + index in chunk`` (CLIP's 77-token chunks with their start/end tokens; T5's
    one list), per family layout ``_LAYOUTS`` (SD1.x/SD2.x/SDXL, Flux.1, Chroma and other T5-only, SD3 with its
    T5 part after the CLIP part). Appended padding (:func:`pad_panel_tokens`) moves no position. Returns one
    empty dict per panel (and logs why) for any other encoder, or when the layout's length disagrees with
    ``cond_length`` (the encoded token count), so no span can point at the wrong tokens.
    """
    none = tuple({} for _ in story.panels)
    keys = frozenset(clip.tokenize(""))
    parts = _LAYOUTS.get(keys)
    model = clip.cond_stage_model
    if parts and len(parts) > 1:  # SD3 drops the parts of missing encoders
        parts = tuple(p for p in parts if any(getattr(model, f"clip_{k}" if k in "lg" else k, None) is not None
                                              for k in p))
    if not parts:
        logging.info("%s: no character token spans for text encoder(s) %s", NODE, sorted(keys))
        return none
    shift = STYLES[story.style][0].index("{prompt}")
    lists = [clip.tokenize(text, return_word_ids=True) for text in story.styled_prompts()]
    lengths = [max(sum(map(len, t[part[0]])) for t in lists) for part in parts]  # after padding to the longest
    if sum(lengths) != cond_length:
        logging.warning("%s: no character token spans: the text encoder gives %d tokens, its token lists %d",
                        NODE, cond_length, sum(lengths))
        return none
    out = []
    for panel, tokens, text in zip(story.panels, lists, story.styled_prompts()):
        spans: dict = {}
        for name, start, stop in panel.mentions:
            found, offset = [], 0
            for part, length in zip(parts, lengths):
                per_key = [_mention_positions(clip, k, text, _content(tokens[k]), shift + start, shift + stop)
                           for k in part]
                if any(p != per_key[0] for p in per_key[1:]):
                    logging.warning("%s: no character token spans: %s tokenize the prompt differently", NODE, part)
                    return none
                found += [offset + p for p in per_key[0]]
                offset += length
            spans[name] = spans.get(name, ()) + _ranges(found)
        out.append(spans)
    return tuple(out)


def encode_story(clip, story: Story, negative: str) -> tuple[list, list, Story]:
    """(positive per-panel CONDITIONING, negative CONDITIONING, ``story`` with each panel's ``spans`` set by
    :func:`story_spans`) for ``story`` with its ``style``."""
    positive = encode_panels(clip, list(story.styled_prompts()))
    spans = story_spans(clip, story, positive[0][0].shape[1])
    panels = tuple(replace(p, spans=s) for p, s in zip(story.panels, spans))
    return positive, encode_negative(clip, negative, story.style), replace(story, panels=panels)
