"""The roles of a patched self-attention layer, one short function each over the model call's context
(context.py), and the thin patch objects ComfyUI calls.

- :func:`share` (CSA, paper Sec. 3.1): image i keeps its queries and attends to its own tokens I_i plus S_i,
  tokens sampled from the other images of its group.
- :func:`record` (the reference app's write phase): keep the hidden states of the sampled reference tokens,
  before the layer projects them.
- :func:`read` (its read phase): each panel attends to its own tokens plus its characters' recorded tokens,
  projected by this layer's own to_k/to_v, and, when the batch shares, plus S_i; with subject masks each query
  sees only the tokens of its character's region (issue 10).

None of them reads anything back from the device: every decision was taken when the call's context was built.
"""
from __future__ import annotations

import torch

from ..errors import StoryDiffusionError, UnsupportedModelError
from .bank import layer_name
from .context import CONTEXT, NODE, Call, Level
from .csa import consistent_self_attention, gather_tokens, own_then_extra, slot_attention


def _attention(previous, extra_options):
    """The layer's attention ``f(q, k, v)`` on ``[rows, tokens, heads * dim_head]``: an attn1 replace that was
    on the layer before (it then receives the extended keys), else ComfyUI's selected kernel."""
    if previous is not None:
        return lambda q, k, v, *_, **__: previous(q, k, v, extra_options)

    def attend(q, k, v, *_, mask=None, **__):
        import comfy.ldm.modules.attention as comfy_attention

        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"], mask=mask,
                                                   attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)
    return attend


def _fits(n: int, tokens: int, layer) -> None:
    if n != tokens:
        raise UnsupportedModelError(f"{NODE}: self-attention layer {layer.name} has {n} tokens where its level "
                                    f"(1/{layer.factor} of the image) has {tokens}: an unknown UNet layout")


def _rows(x: torch.Tensor, images: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the images of every chunk of ``x`` ``[chunks * images, ...]`` by ``perm``."""
    return x.reshape(-1, images, *x.shape[1:])[:, perm].reshape(x.shape)


def share(q, k, v, ctx: Call, layer, attend):
    """CSA: every image attends to its own tokens and to the tokens its level's plan samples from the other
    images of its chunk (reference mode: references among themselves, later images from the references)."""
    level: Level | None = ctx.level(layer)
    if level is None:
        return attend(q, k, v)
    _fits(q.shape[1], level.tokens, layer)
    if level.order is None:
        return consistent_self_attention(q, k, v, None, level.plan, attention_fn=attend, routing=level.routing)
    # a context window whose references are not its first rows: put them first, and back afterwards
    out = consistent_self_attention(*(_rows(t, ctx.images, level.order) for t in (q, k, v)), None, level.plan,
                                    attention_fn=attend)
    return _rows(out, ctx.images, level.inverse)


def record(n: torch.Tensor, ctx: Call, name: str) -> None:
    """Write phase: keep layer ``name``'s hidden states ``n`` ``[rows, tokens, C]`` of the sampled reference
    tokens (the call's images are the references), per CFG half, into this step's bank entries (with subject
    masks, with the tokens' region bits)."""
    targets = ctx.record.targets.get(name)
    if not targets:
        return
    picks = ctx.record.picks.get(n.shape[1])
    if picks is None:
        raise UnsupportedModelError(f"{NODE}: self-attention layer {name} has {n.shape[1]} tokens, which no level "
                                    f"of a {ctx.latent_hw[0]}x{ctx.latent_hw[1]} latent has: an unknown UNet layout")
    chosen = n.reshape(len(ctx.chunks), -1, n.shape[2])[:, picks]  # (chunks, references * M, C)
    bits = None if ctx.record.bits is None else ctx.record.bits[n.shape[1]]
    for chunk, key, dest in targets:
        ctx.record.run.write(key, dest, chosen[chunk], bits)


def read(q, k, v, ctx: Call, layer, attend):
    """Read phase: each panel attends to its own tokens, to the recorded tokens of its characters at this step,
    layer and CFG half, and (sharing) to the tokens CSA samples from the other panels of its batch.

    Bank tokens are projected once per (bank set, half) by this layer's own to_k/to_v (ComfyUI's ops: LoRAs and
    low-VRAM casting apply) and broadcast over the panels that read them; one attention call per group of
    panels reading the same number of tokens. With subject masks (``reading.routes``), one call per slot with a
    key mask instead (csa.slot_attention): a query of slot k sees its own tokens, the tokens of its k-th
    character's bank inside that character's region, and the CSA tokens inside its region.
    """
    reading = ctx.read
    shared_k = shared_v = None
    level = ctx.level(layer) if reading.share else None
    if level is not None:
        _fits(q.shape[1], level.tokens, layer)
        shared_k, shared_v = (gather_tokens(t.reshape(-1, ctx.images, *t.shape[1:]), level.plan.all_idx)
                              for t in (k, v))
    groups = reading.groups[layer.name]
    routes = None if reading.routes is None else reading.routes[layer.name]
    whole = len(groups) == 1 and isinstance(groups[0].rows, slice) and groups[0].count == ctx.rows
    out = None if whole else torch.empty_like(q)
    for g, group in enumerate(groups):
        banks = [(span, _project(reading, keys, layer, q.dtype)) for span, keys in group.parts if keys]
        kk = _keys(k, group, [(span, p[0]) for span, p in banks], shared_k)
        vv = _keys(v, group, [(span, p[1]) for span, p in banks], shared_v)
        if routes is None or kk.shape[1] == q.shape[1]:
            result = attend(q[group.rows], kk, vv)
        else:
            result = slot_attention(own_then_extra(q[group.rows], kk, vv, None, attend, q.shape[1]), *routes[g])
        if whole:
            return result
        out[group.rows] = result
    return out


def _project(reading, keys: tuple, layer, dtype) -> tuple:
    """Keys and values ``(1, E, C)`` of the bank tokens ``keys`` = ((bank, half), ...) in this layer."""
    hidden = torch.cat([reading.tokens[(j, layer.name, half)].dequantize(dtype) for j, half in keys])[None]
    return layer.attn1.to_k(hidden), layer.attn1.to_v(hidden)


def _keys(own: torch.Tensor, group, banks: list, shared: torch.Tensor | None) -> torch.Tensor:
    """``[group rows, N + E (+ shared), C]``: the rows' own keys, each span's bank keys broadcast over its rows,
    then the rows' CSA keys."""
    own_rows = own[group.rows]
    if not banks and shared is None:
        return own_rows
    n = own.shape[1]
    e = group.extra
    out = own.new_empty(group.count, n + e + (0 if shared is None else shared.shape[1]), own.shape[2])
    out[:, :n] = own_rows
    for span, tokens in banks:
        out[span, n:n + e] = tokens
    if shared is not None:
        out[:, n + e:] = shared[group.rows]
    return out


class SelfAttention:
    """ComfyUI's attn1 replace of one layer, ``f(q, k, v, extra_options)``: looks the call's context up and runs
    the layer's role (read where it reads banks, else share).

    ``key``: (block, number, depth); ``factor``: its image-level downsampling factor; ``attn1``: its attention
    module (to_k/to_v project bank tokens); ``previous``: an attn1 replace that was there before, still called
    (with the extended keys); ``shares``: a CSA layer; ``reader``: the BankReader it reads (None: it does not).
    Immutable; ModelPatcher.clone() shares it rather than copying it.
    """

    kv = 1  # bank rows per recorded token: its hidden state

    def __init__(self, key: tuple, factor: int, attn1, previous=None, shares: bool = True, reader=None):
        self.key, self.factor, self.attn1, self.previous = key, factor, attn1, previous
        self.shares, self.reader = shares, reader
        self.name = layer_name(key[:2], key[2])

    def __deepcopy__(self, memo):
        return self

    @property
    def channels(self) -> int:
        return self.attn1.to_k.in_features

    def reading(self, reader) -> "SelfAttention":
        return SelfAttention(self.key, self.factor, self.attn1, self.previous, self.shares, reader)

    def __call__(self, q, k, v, extra_options):
        attend = _attention(self.previous, extra_options)
        ctx = extra_options.get(CONTEXT)
        if ctx is None:
            raise StoryDiffusionError(
                f"{NODE}: self-attention layer {self.name} was called outside the patched model's model call (its "
                f"context is missing): run the model through a ComfyUI sampler")
        if q.shape[0] != ctx.rows:  # not the call's image rows (a temporal layout): plain attention
            return attend(q, k, v)
        if self.reader is not None and ctx.read is not None:
            return read(q, k, v, ctx, self, attend)
        return share(q, k, v, ctx, self, attend)


class RecordPatch:
    """ComfyUI attn1_patch of a recording model: called with every transformer block's normed input before its
    projections; records the layers the call's context names and changes nothing."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        ctx = extra_options.get(CONTEXT)
        block = extra_options.get("block")
        if ctx is not None and ctx.record is not None and block is not None and n.shape[0] == ctx.rows:
            record(n, ctx, layer_name(block, extra_options.get("block_index", 0)))
        return n, context, value
