"""Consistent Self-Attention on DiT models: the joint-attention adapter beside the UNet one (roles.py).

A DiT has no self-attention of its own: every block runs one attention over the joint sequence of the text
tokens, the image tokens and any appended reference (Kontext) tokens. ComfyUI calls
``transformer_options["optimized_attention_override"]`` for every attention call of the model, with
``block_type``/``block_index`` set by the model; :class:`JointAttention` is that override. It looks the model
call's context up (context.py, built once per call by patch.StoryAttention) and, in the patched blocks, lets the
IMAGE-token queries of image i attend to its own whole sequence plus the image tokens the call's plan samples
from the other images of its chunk (csa.joint_consistent_attention); text queries keep their own sequence.

Shared keys are taken after RoPE, with the positions of the image that owns them: every image of a batch has the
same position grid, so a token of image j at (y, x) acts for image i as if it sat at (y, x) of image i. Shared
tokens mostly influence the same region of the other panels (a locality prior that copies layout more than
UNet CSA, whose self-attention has no positions).

Families: Flux.1, Flux.2 and Chroma (double-stream blocks, then single-stream blocks over [txt, img]);
Qwen-Image (joint blocks only, block_type "double", [txt, img] after RoPE, 5-D latents with one frame; current
ComfyUI masks padded text keys with a ``[rows, 1, N]`` mask, which csa.py reads as ComfyUI does); Lumina2 and
Z-Image (NextDiT: main blocks over [txt, img], Z-Image padding both to multiples of 32 with pad tokens that stay
with their own row; its context and noise refiners attend over the text or the image alone and are left alone;
0.3.75 names no block there, so the main blocks are the calls over exactly the padded sequence, counted per
model call). SD3/SD3.5 (MMDiT: joint blocks over [context, x], no RoPE; SD3.5 Medium's MMDiT-X blocks also run
an image-only self-attention, its x_block's attn2, which gets the UNet semantics: image i attends to its own
tokens plus the tokens sampled from the other images) and
HiDream (IMAGE first, then T5 and two llama streams, after RoPE; double- then single-stream blocks, every one over
the same sequence) name no block either: their calls are counted per model call in the order the model makes them
(:attr:`Family.calls`). The text part is the conditioning's token count as the model pads it (plus what the model
adds: HiDream's llama tokens), read by the APPLY_MODEL wrapper.

DiT image tokens sit at 1/16 of the image (VAE 8 x patch 2; Flux.2: VAE 16 x patch 1): their layers use the
node's 1/16 rate, and subject masks (issue 10) route on their row-major grid (:meth:`Family.grid`): an image query
sees only the shared tokens inside its character's region (csa.routed_attention), its own sequence in full.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import StoryDiffusionError, UnsupportedModelError
from .context import CONTEXT, NODE, Call
from .csa import (attend_outside, image_query_mask, joint_attend, joint_consistent_attention, joint_mask, joint_output,
                  slot_attention)

FACTOR = 16  # image-level downsampling of every DiT image token
OVERRIDE = "optimized_attention_override"  # transformer_options key of ComfyUI's attention override
# The node's dit_blocks choices, by stage: "single" = the later blocks, "double" = the early ones.
DIT_BLOCK_CHOICES = {"single-stream": ("single",), "double-stream": ("double",), "all": ("double", "single")}


@dataclass(frozen=True)
class Family:
    """A DiT family CSA supports: ``name``; ``stages``: dit_blocks stage ("double": early, "single": later) ->
    ``((block_type, indices), ...)``, the blocks by ComfyUI's transformer_options["block_type"] and
    ["block_index"]; ``patch``: patch size (image tokens = ceil(H / patch) x ceil(W / patch) of the latent; the
    joint sequence is text, then image, then any appended reference or padding tokens).

    ``pad``: the model pads its text and its image tokens to multiples of ``pad`` (Z-Image: 32; 1: none).
    ``exact``: the patched blocks' sequence is exactly the padded text and image (NextDiT, whose refiner blocks
    also attend, over the text or the image alone, and which names no block index on 0.3.75; SD3; HiDream).
    ``calls``: for a model that names no block, the ``(block_type, index)`` of each of its calls over the whole
    sequence or (block_type "x_block": SD3.5's image-only attn2) over the image tokens alone, in call order.
    ``image_first``: the image tokens come first, the text after them (HiDream).
    ``more_text``: tokens the model adds to the conditioning's text, from the model call's other conditioning
    (keyword arguments of the model call): HiDream's two llama streams.
    ``spans``: the text encoder's tokens are the conditioning's tokens one by one (T5, CLIP), so the story's
    character token spans point into the joint sequence's text (Flux.1, Chroma, SD3/SD3.5); the LLM encoders of
    the other families have none.
    """

    name: str
    stages: dict
    patch: int
    pad: int = 1
    exact: bool = False
    calls: tuple = ()
    image_first: bool = False
    more_text: Callable[[dict], int] | None = None
    spans: bool = False

    def grid(self, latent_hw: tuple) -> tuple[int, int]:
        """The image tokens as a row-major ``(rows, columns)`` grid: every family pads the latent to whole patches
        and patchifies it row by row (Flux, Chroma, Qwen-Image: ``(h w)``; SD3: its patch conv, flattened; NextDiT,
        HiDream: ``(H W)``)."""
        return math.ceil(latent_hw[0] / self.patch), math.ceil(latent_hw[1] / self.patch)

    def image_tokens(self, latent_hw: tuple) -> int:
        h, w = self.grid(latent_hw)
        return h * w

    def layout(self, text: int, latent_hw: tuple, conds: dict | None = None) -> tuple:
        """``(start, joint)`` tokens of the patched blocks for a conditioning of ``text`` tokens (``conds``: the
        model call's other conditioning): where the image tokens start (after the text as the model pads it; 0
        where the image comes first), and the whole sequence where it is ``exact`` (else None: it may hold more)."""
        text = -(-(text + (self.more_text(conds or {}) if self.more_text else 0)) // self.pad) * self.pad
        joint = text + -(-self.image_tokens(latent_hw) // self.pad) * self.pad if self.exact else None
        return 0 if self.image_first else text, joint


SUPPORTED = "Flux.1 (dev, schnell), Flux.2, Chroma, Qwen-Image, Lumina2, Z-Image, SD3, SD3.5, HiDream"


def _halves(block_type: str, count: int) -> dict:
    """Stages of a model with one kind of block: the earlier half ("double"; the middle block of an odd count
    counts as early) and the later half ("single")."""
    half = (count + 1) // 2
    return {"double": ((block_type, range(half)),), "single": ((block_type, range(half, count)),)}


def _mmdit(net) -> Family:
    """SD3/SD3.5: one kind of joint block (halves as :func:`_halves`); a block's image-only attn2 (MMDiT-X) goes
    with its block. The model makes, per block, the joint call, then the attn2 call where it has one."""
    own = [i for i, block in enumerate(net.joint_blocks) if block.x_block.x_block_self_attn]
    stages = {stage: entries + (("x_block", [i for i in own if i in entries[0][1]]),)
              for stage, entries in _halves("double", len(net.joint_blocks)).items()}
    calls = tuple(c for i in range(len(net.joint_blocks)) for c in (("double", i),) + ((("x_block", i),) if i in own
                                                                                         else ()))
    return Family("SD3.5 (MMDiT-X)" if own else "SD3", stages, net.patch_size, exact=True, calls=calls, spans=True)


def _hidream_llama_tokens(conds: dict) -> int:
    """HiDream's text after T5: the last llama layer's tokens and the block's own llama layer's, as many each."""
    return 2 * conds["encoder_hidden_states_llama3"].shape[2]


def dit_family(model_patcher, node: str = NODE) -> Family | None:
    """The :class:`Family` of a supported DiT, None for a model that is not a DiT (a UNet). Raises
    UnsupportedModelError naming ``node`` for DiTs and other transformers it does not support.

    Flux.1/Flux.2/Chroma/HiDream: "double" = the double-stream blocks, "single" = the single-stream blocks.
    Qwen-Image, Lumina2/Z-Image (NextDiT) and SD3/SD3.5 (MMDiT) have one kind of joint block (block_type
    "double"): "double" = the earlier half, "single" = the later half, as Flux's later blocks and the reference
    app's UNet decoder; an MMDiT-X block's image-only attn2 is patched with its block. NextDiT's context and
    noise refiners (text only, image only) are never patched."""
    import comfy.ldm.chroma.model as chroma
    import comfy.ldm.flux.model as flux
    import comfy.ldm.hidream.model as hidream
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ldm.qwen_image.model as qwen_image

    net = model_patcher.get_model_object("diffusion_model")
    if hasattr(net, "input_blocks") or hasattr(net, "output_blocks"):
        return None
    if type(net) in (flux.Flux, chroma.Chroma):
        name = "Chroma" if type(net) is chroma.Chroma else "Flux.2" if len(net.params.axes_dim) == 4 else "Flux.1"
        return Family(name, {"double": (("double", range(len(net.double_blocks))),),
                             "single": (("single", range(len(net.single_blocks))),)}, net.patch_size,
                      spans=name != "Flux.2")
    if type(net) is qwen_image.QwenImageTransformer2DModel:
        return Family("Qwen-Image", _halves("double", len(net.transformer_blocks)), net.patch_size)
    if type(net) is lumina.NextDiT:
        pad = net.pad_tokens_multiple
        return Family("Z-Image" if pad else "Lumina2", _halves("double", len(net.layers)), net.patch_size,
                      pad or 1, exact=True, calls=tuple(("double", i) for i in range(len(net.layers))))
    if type(net) is mmdit.OpenAISignatureMMDITWrapper:
        return _mmdit(net)
    if type(net) is hidream.HiDreamImageTransformer2DModel:
        double, single = len(net.double_stream_blocks), len(net.single_stream_blocks)
        return Family("HiDream", {"double": (("double", range(double)),), "single": (("single", range(single)),)},
                      net.patch_size, exact=True, image_first=True, more_text=_hidream_llama_tokens,
                      calls=tuple(("double", i) for i in range(double)) + tuple(("single", i) for i in range(single)))
    raise UnsupportedModelError(f"{node}: input 'model': expected SD1.x, SD2.x, SDXL or one of the DiT families "
                                f"{SUPPORTED}, got {type(net).__name__}")


class JointLayer:
    """One patched DiT block's joint attention: ``key`` (block type, index, 0) keys the schedule's gates;
    ``factor``: 16; ``name``: "double.3"; ``image_only``: an attention over the image tokens alone (block type
    "x_block", SD3.5's attn2); ``shares``: a CSA block; ``channels``: heads x head dim of its keys (sizes a
    recording's entries); ``reader``: the BankReader it reads (None: it reads no bank); ``family``: the model's
    Family. Immutable."""

    factor = FACTOR
    kv = 2  # bank rows per recorded token: its key and its value

    def __init__(self, block_type: str, index: int, channels: int = 0, shares: bool = True, reader=None,
                 family: Family | None = None):
        self.key = (block_type, index, 0)
        self.name = f"{block_type}.{index}"
        self.image_only = block_type == "x_block"
        self.channels, self.shares, self.reader, self.family = channels, shares, reader, family

    def derived(self, **changes) -> "JointLayer":
        fields = dict(channels=self.channels, shares=self.shares, reader=self.reader, family=self.family)
        return JointLayer(*self.key[:2], **{**fields, **changes})


@dataclass(frozen=True, eq=False)
class JointAttention:
    """ComfyUI's ``optimized_attention_override`` of a patched DiT, ``override(func, q, k, v, heads, ...)``.

    ``layers``: ``{(block_type, index): JointLayer}``; ``previous``: an override that was on the model before,
    called instead of ``func`` (with the extended keys where CSA runs); ``calls``: :attr:`Family.calls`. Every
    other call (blocks not patched, calls that are not the model call's rows) passes through unchanged.
    q/k/v come as ``[rows, heads, N, D]`` (``skip_reshape``) or ``[rows, N, heads * D]`` (SD3, HiDream; SD3's v
    as ``[rows, N, heads, D]``): then viewed per head and handed on with ``skip_reshape``, which returns the same
    ``[rows, N, heads * D]``.
    """

    layers: dict
    previous: object = None
    calls: tuple = ()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        mask = args[0] if args else kwargs.pop("mask", None)
        args = args[1:]

        def attend(q, k, v, mask):
            if self.previous is not None:
                return self.previous(func, q, k, v, heads, *args, mask=mask, **kwargs)
            return func(q, k, v, heads, *args, mask=mask, **kwargs)

        options = kwargs.get("transformer_options") or {}
        ctx: Call | None = options.get(CONTEXT)
        block = called_block(options, q, self.calls, *((ctx.joint, ctx.text, ctx.blocks) if ctx else (None, 0, None)))
        layer = self.layers.get(block)
        if layer is None:
            return attend(q, k, v, mask)
        if ctx is None:
            raise StoryDiffusionError(f"{NODE}: DiT block {layer.name} was called outside the patched model's model "
                                      f"call (its context is missing): run the model through a ComfyUI sampler")
        if q.shape[0] != ctx.rows:
            return attend(q, k, v, mask)
        if q.ndim == 3:  # SD3 hands v on as [rows, N, heads, D]
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            kwargs["skip_reshape"] = True
        token_dim = 2 if kwargs.get("skip_output_reshape") else 1
        if layer.reader is not None and ctx.read is not None:
            return read(q, k, v, ctx, layer, attend, mask, token_dim)
        level = ctx.level(layer)
        recording = ctx.record is not None and layer.name in ctx.record.targets
        if level is None and not recording:
            return attend(q, k, v, mask)
        span = _span(q, ctx, layer, layer.family.image_tokens(ctx.latent_hw))
        if recording:  # also where the references do not share (a bank of one reference)
            record(k, v, ctx, layer.name, span)
        if level is None:
            return attend(q, k, v, mask)
        if level.order is not None:
            raise UnsupportedModelError(f"{NODE}: context windows with reference_count > 0 are not supported on DiT "
                                        f"models")
        return joint_consistent_attention(q, k, v, level.plan, span, attend, mask, token_dim, level.routing)


def called_block(options: dict, q, calls: tuple, joint: int | None, start: int, counter: Iterator | None) -> tuple:
    """``(block_type, block_index)`` of one attention call: as the model names it in ``options``; for a model that
    names no block (``calls``: :attr:`Family.calls`), the next of its calls when the call runs over the whole
    ``joint`` sequence (or, SD3.5's attn2, over the image tokens after the text's ``start`` tokens alone), counted by
    the model call's ``counter``; ``(None, None)`` for any other call. ``q``: ``[rows, heads, N, D]`` or ``[rows, N,
    heads * D]``."""
    block = (options.get("block_type"), options.get("block_index"))
    tokens = q.shape[2 if q.ndim == 4 else 1]
    if block[1] is None and joint is not None and (tokens == joint or tokens == joint - start and any(
            kind == "x_block" for kind, _ in calls)):
        index = next(counter)  # a model that names no block: its blocks run in order
        block = calls[index] if index < len(calls) else block
    return block


def set_override(options: dict, build: Callable[[object], object]) -> None:
    """Set ``options``' attention override to ``build(previous)`` (``previous``: the override there, or None), under
    the observing overrides on top (``observes``: character-mask recording), which must keep seeing the model's own
    attention calls, not CSA's extended keys, whichever node was applied first."""
    def place(current):
        if getattr(current, "observes", False):
            return dataclasses.replace(current, previous=place(current.previous))
        return build(current)
    options[OVERRIDE] = place(options.get(OVERRIDE))


def _span(q, ctx: Call, layer, tokens: int) -> tuple:
    """``(start, stop)`` of the image tokens in block ``layer``'s joint sequence; UnsupportedModelError for a layout
    the call's text and ``tokens`` image tokens do not explain."""
    if layer.image_only:  # SD3.5's attn2: the image tokens alone
        span, need = (0, tokens), tokens
    else:
        span = (ctx.text, ctx.text + tokens)
        need = ctx.joint or span[1]
    if q.shape[2] < need or ctx.joint is not None and q.shape[2] != need:
        raise UnsupportedModelError(f"{NODE}: DiT block {layer.name} has {q.shape[2]} tokens where the call's "
                                    f"{ctx.text} text and {tokens} image tokens need {need}: an unknown "
                                    f"layout (e.g. reference images the model appends)")
    return span


def record(k, v, ctx: Call, name: str, span: tuple) -> None:
    """Write phase on a DiT: keep block ``name``'s keys and values ``[rows, heads, N, D]`` (after RoPE) of the
    references' sampled image tokens (context.reference_draw, the tokens reference mode shows later images), per
    CFG half, as one bank entry ``(2 * R * M, heads * D)``: keys, then values; with subject masks, with one region bit
    a token (``(R * M,)``, for its key and its value)."""
    targets = ctx.record.targets.get(name)
    if not targets:
        return
    tokens = span[1] - span[0]
    picks = ctx.record.picks[tokens]
    source, token = picks // tokens, span[0] + picks % tokens

    def chosen(x):  # [chunks, R * M, heads * D]; indexing puts the picks first
        x = x.reshape(len(ctx.chunks), -1, *x.shape[1:])[:, source, :, token]
        return x.transpose(0, 1).reshape(x.shape[1], x.shape[0], -1)
    keys, values = chosen(k), chosen(v)
    bits = None if ctx.record.bits is None else ctx.record.bits[tokens]
    for chunk, key, dest in targets:
        ctx.record.run.write(key, dest, torch.cat((keys[chunk], values[chunk])), bits)


def read(q, k, v, ctx: Call, layer: JointLayer, attend, mask, token_dim: int):
    """Read phase on a DiT: the IMAGE queries of each panel attend to its own joint sequence, its characters'
    recorded keys and values of this step, block and CFG half (broadcast over the panels reading them, one attention
    call per group of panels reading as many), and, when the batch shares, the image tokens CSA samples from the
    other panels; TEXT (and appended) queries attend to their own sequence only. q, k, v: ``[rows, heads, N, D]``
    after RoPE; ``attend(q, k, v, mask)`` returns the query tokens on ``token_dim``; ``mask`` as
    csa.joint_consistent_attention reads it (the extra keys are visible). Equal to reference mode with the
    recorded references in front of the batch (README: bank-free reference mode).

    With subject masks (``reading.routes``, issue 10) one call per slot with a key mask instead
    (csa.slot_attention): an image query of slot k sees its own sequence (under ``mask``), the tokens of its k-th
    character's bank whose region bit is set, and the CSA tokens inside that character's regions; an image query
    of no slot (outside every region of a multi-character panel) its own sequence only."""
    reading = ctx.read
    rows, h, n, d = q.shape
    tokens = layer.family.image_tokens(ctx.latent_hw)
    s, e = _span(q, ctx, layer, tokens)
    mask = joint_mask(mask)
    level = ctx.level(layer) if reading.share else None
    shared = None
    if level is not None and level.plan.per_source:  # [rows, heads, S, D] of each row's CSA tokens
        idx = level.plan.all_idx
        source, token = idx // tokens, s + idx % tokens
        shared = tuple(x.reshape(-1, ctx.images, h, n, d)[:, source, :, token].permute(2, 0, 3, 1, 4)
                       .reshape(rows, h, -1, d) for x in (k, v))
    routes = None if reading.routes is None else reading.routes[layer.name]
    out = attend_outside(q, k, v, (s, e), attend, mask, token_dim)
    for g, group in enumerate(reading.groups[layer.name]):
        extra = group.extra // 2
        banks = [(span, _bank(reading, keys, layer.name, h, q.dtype)) for span, keys in group.parts if keys]
        kk, vv = (_keys(x, group, [(span, kv[i]) for span, kv in banks], extra, None if shared is None else shared[i])
                  for i, x in enumerate((k, v)))
        part_mask = None if mask is None else image_query_mask(
            mask if mask.shape[0] == 1 else mask[group.rows], s, e, kk.shape[2] - n)
        qq = q[group.rows][:, :, s:e]
        if routes is None or kk.shape[2] == n:
            res = attend(qq, kk, vv, part_mask)
        else:
            res = slot_attention(joint_attend(qq, kk, vv, attend, part_mask, n), *routes[g], token_dim)
        out = joint_output(res, rows, n, token_dim) if out is None else out
        out.narrow(token_dim, s, e - s)[group.rows] = res
    return out


def _bank(reading, keys: tuple, name: str, heads: int, dtype) -> tuple:
    """Keys and values ``(1, heads, E, D)`` of the bank entries ``keys`` = ((bank, half), ...) of block ``name``."""
    entries = [reading.tokens[(j, name, half)].dequantize(dtype) for j, half in keys]
    k = torch.cat([t[: len(t) // 2] for t in entries])
    v = torch.cat([t[len(t) // 2:] for t in entries])
    return tuple(x.reshape(1, len(x), heads, -1).transpose(1, 2) for x in (k, v))


def _keys(own, group, banks: list, extra: int, shared) -> torch.Tensor:
    """``[group rows, heads, N + extra (+ S), D]``: the rows' own keys, each span's bank keys broadcast over its
    rows, then the rows' CSA keys."""
    n = own.shape[2]
    out = own.new_empty(group.count, own.shape[1], n + extra + (0 if shared is None else shared.shape[2]),
                        own.shape[3])
    out[:, :, :n] = own[group.rows]
    for span, tokens in banks:
        out[span, :, n:n + extra] = tokens
    if shared is not None:
        out[:, :, n + extra:] = shared[group.rows]
    return out


def joint_width(model_patcher) -> int:
    """Channels of a supported DiT's keys and values (heads x head dim, after a grouped-query model repeats its
    key/value heads): the model's width (Flux-family ``hidden_size``, Qwen-Image ``inner_dim``, NextDiT ``dim``)."""
    net = model_patcher.get_model_object("diffusion_model")
    return next(int(getattr(net, a)) for a in ("hidden_size", "inner_dim", "dim") if hasattr(net, a))


def dit_layers(family: Family, stages: tuple) -> dict:
    """``{(block_type, index): JointLayer}`` for every block of ``stages`` ("double", "single") in ``family``."""
    return {(kind, i): JointLayer(kind, i, family=family) for stage in stages for kind, indices in family.stages[stage]
            for i in indices}


__all__ = ["DIT_BLOCK_CHOICES", "FACTOR", "OVERRIDE", "Family", "JointAttention", "JointLayer", "SUPPORTED",
           "called_block", "dit_family", "dit_layers", "joint_width", "set_override"]
