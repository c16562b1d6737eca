"""Consistent Self-Attention (CSA), pure torch.

StoryDiffusion (Zhou et al., arXiv 2405.01434, Sec. 3.1): in a self-attention layer, image i of a group keeps
its own queries Q_i and attends to keys/values of P_i = concat(I_i, S_i), where I_i are all of its own tokens
and S_i = RandSample(tokens of the other images). The layer's own projections are reused (training-free).

This module works on *projected* q/k/v (``[rows, tokens, heads * dim_head]``), so a shared token is projected
once, by the image that owns it, and merely gathered by the others. Sampling draws, for every (image, source
image) pair, exactly ``M = round(rate * N)`` of the source's N tokens without replacement: every token of
another image is visible with probability ``rate`` (the paper's and the reference app's keep-rate) and every
image of a group gets the same number of extra keys, so a whole group is ONE batched attention call with no
mask (two calls when reference images and story images have different key counts). Rate 0 is plain
self-attention; rate 1 is attention over the union of the group's tokens.

With R reference images (the reference app's story protocol) every later image sees the SAME sampled tokens of
the references (:func:`reference_tokens`), as every panel of its read phase reads the same stored tokens, and
the references share among themselves exactly as they would in a batch of their own: a batch with the
references in front gives every later image what reading a character bank recorded from them gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
                   **_ignored) -> torch.Tensor:
    """Multi-head attention on ``[rows, tokens, heads*dim_head]`` tensors (same layout out), via torch SDPA;
    ``mask``: None or additive/boolean, broadcastable to ``[rows, heads, Nq, Nk]``.

    The default ``attention_fn``; inside ComfyUI the patch passes ComfyUI's selected backend instead.
    """
    rows, nq, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2).reshape(rows, nq, inner)


def tokens_per_source(num_tokens: int, rate: float) -> int:
    """M = round(rate * N): how many tokens of each other image one image sees (0 <= M <= N)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {rate}")
    return min(num_tokens, int(math.floor(rate * num_tokens + 0.5)))


@dataclass(frozen=True)
class SamplingPlan:
    """Which tokens each image of a group of ``num_images`` sees besides its own.

    ``ref_count`` R: 0 means all-to-all (the paper): ``all_idx`` (B, (B-1)*M) holds, for every image, flat
    indices into the group's tokens flattened as ``image * N + token`` ((B, (T-1)*M) with a window of T).
    R > 0: the first R images are the references; ``ref_idx`` (R, (R-1)*M) for the references (among
    themselves) and ``story_idx`` (B-R, R*M) for every other image (the same tokens of the references for all).
    Index tensors are int64 on the plan's device.
    """

    num_images: int
    num_tokens: int
    per_source: int
    ref_count: int
    all_idx: torch.Tensor | None = None
    ref_idx: torch.Tensor | None = None
    story_idx: torch.Tensor | None = None

    def __post_init__(self):
        # Key index per target image: its own N tokens, then its extra tokens. One gather then builds every
        # image's keys in place (no separate gather + concatenation copy).
        n, r = self.num_tokens, self.ref_count
        for name, idx, first in (("all_keys", self.all_idx, 0), ("ref_keys", self.ref_idx, 0),
                                 ("story_keys", self.story_idx, r)):
            keys = None
            if idx is not None:
                own = (torch.arange(idx.shape[0], device=idx.device)[:, None] + first) * n
                own = own + torch.arange(n, device=idx.device)[None]
                keys = torch.cat((own, idx), dim=1)
            object.__setattr__(self, name, keys)

    def to(self, device: torch.device) -> "SamplingPlan":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SamplingPlan(self.num_images, self.num_tokens, self.per_source, self.ref_count,
                            move(self.all_idx), move(self.ref_idx), move(self.story_idx))


@dataclass(frozen=True)
class Routing:
    """Subject masks of one group of B images at one level (issue 10; regions.py builds it).

    ``member`` bool ``(B * N, C)``: token t of image j (flat ``j * N + t``, the plan's indexing) lies in character
    c's region. ``slots`` long ``(B, K)``: the characters image i routes (-1 pads). ``query_slot`` long ``(B, N)``:
    the slot each query of image i reads, -1 for none. Query n of image i with slot s >= 0 keeps all its own
    tokens and, of the extra tokens its plan samples, only those in the region of character ``slots[i, s]``;
    with s = -1 it attends to its own tokens only. Device tensors (the plan's device).
    """

    member: torch.Tensor
    slots: torch.Tensor
    query_slot: torch.Tensor


def _draw(targets: int, sources: list[list[int]], num_tokens: int, per_source: int,
          generator: torch.Generator) -> torch.Tensor:
    """For each target t, ``per_source`` distinct tokens from each source image in ``sources[t]``."""
    n_src = len(sources[0])
    if targets == 0 or n_src == 0 or per_source == 0:
        return torch.empty(targets, 0, dtype=torch.long)
    # Top-M of i.i.d. uniform scores = M tokens drawn without replacement, independently per (target, source).
    scores = torch.rand(targets, n_src, num_tokens, generator=generator)
    picked = scores.topk(per_source, dim=-1, sorted=False).indices  # (targets, n_src, M)
    base = torch.tensor(sources, dtype=torch.long).unsqueeze(-1) * num_tokens
    return (picked + base).reshape(targets, n_src * per_source)


def window_sources(num_images: int, tile_size: int) -> list[list[int]]:
    """Sliding window: image i shares with the other images of the ``tile_size`` consecutive images around it.

    The window is centred on i and shifted inward at the batch ends, so every image has exactly
    ``min(tile_size, B) - 1`` partners and one batched call still serves the whole batch. (The paper's
    Algorithm 1 instead runs fixed tiles and averages overlapping outputs; both bound the keys per image.)
    """
    t = max(1, min(tile_size, num_images))
    out = []
    for i in range(num_images):
        start = min(max(0, i - (t - 1) // 2), num_images - t)
        out.append([j for j in range(start, start + t) if j != i])
    return out


def reference_tokens(refs: int, num_tokens: int, per_source: int, generator: torch.Generator) -> torch.Tensor:
    """The tokens of R reference images that every later image sees: ``per_source`` distinct tokens of each
    reference, as flat indices ``(R * M,)`` into the references' tokens flattened as ``image * N + token``,
    reference by reference.

    One draw serves every later image, as in the reference app's read phase (every panel reads the same stored
    tokens). A character bank recorded with the same generator holds exactly these tokens.
    """
    return _draw(1, [list(range(refs))], num_tokens, per_source, generator)[0]


def make_plan(num_images: int, num_tokens: int, rate: float, ref_count: int = 0,
              generator: torch.Generator | None = None, tile_size: int = 0,
              reference_generator: torch.Generator | None = None) -> SamplingPlan:
    """Draw a SamplingPlan on the CPU from ``generator`` (deterministic for a seeded generator).

    ``ref_count`` >= ``num_images`` behaves as all-to-all among the images present. ``tile_size`` > 1 (with
    ``ref_count`` 0): each image shares only with the images of its window (:func:`window_sources`).
    0 < R < B: the first R images share among themselves exactly as a batch of those R images alone would (the
    same draws from ``generator``, whatever follows them); every later image sees the same tokens of the
    references, :func:`reference_tokens` drawn from ``reference_generator`` (default: ``generator``, after the
    references' draws).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    m = tokens_per_source(num_tokens, rate)
    b, r = num_images, ref_count
    if r <= 0 or r >= b:
        if tile_size > 1:
            srcs = window_sources(b, tile_size)
        else:
            srcs = [[j for j in range(b) if j != i] for i in range(b)]
        return SamplingPlan(b, num_tokens, m, 0, all_idx=_draw(b, srcs, num_tokens, m, generator))
    refs = make_plan(r, num_tokens, rate, 0, generator)
    shared = reference_tokens(r, num_tokens, m, reference_generator or generator)
    return SamplingPlan(b, num_tokens, m, r, ref_idx=refs.all_idx, story_idx=shared.expand(b - r, -1))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x ``[G, B, N, C]`` (chunks, images, tokens, channels), idx ``[T, E]`` flat into B*N -> ``[G * T, E, C]``."""
    g, b, n, c = x.shape
    return x.reshape(g, b * n, c)[:, idx].reshape(g * idx.shape[0], idx.shape[1], c)


def consistent_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, plan: SamplingPlan,
                              attention_fn: AttentionFn = sdpa_attention, routing: Routing | None = None,
                              **attn_kwargs) -> torch.Tensor:
    """CSA for ``G`` chunks (e.g. CFG halves) of one group of B images, sharing one plan.

    q, k, v: ``[G * B, N, C]`` with ``row = chunk * B + image`` (ComfyUI's layout), C = heads * dim_head, any
    float dtype. ``plan`` must be on q's device with ``plan.num_images == B`` and ``plan.num_tokens == N``.
    ``routing``: subject masks (:class:`Routing`, the same for every chunk), or None to share whole images.
    Returns ``[G * B, N, C]``. Raises ValueError on a shape mismatch.
    """
    rows, n, c = q.shape
    b = plan.num_images
    if rows % b or n != plan.num_tokens or k.shape[1] != n:
        raise ValueError(f"CSA: q {tuple(q.shape)} / k {tuple(k.shape)} do not fit a plan for "
                         f"{b} images x {plan.num_tokens} tokens")
    if plan.per_source == 0 or b == 1:
        return attention_fn(q, k, v, heads, **attn_kwargs)
    g = rows // b
    q4, k4, v4 = (t.reshape(g, b, n, c) for t in (q, k, v))
    if plan.ref_count == 0 and routing is None:
        keys = plan.all_keys
        return attention_fn(q, gather_tokens(k4, keys), gather_tokens(v4, keys), heads, **attn_kwargs)
    r = plan.ref_count

    def part(sl: slice, keys: torch.Tensor) -> torch.Tensor:
        qs, kk, vv = q4[:, sl].reshape(-1, n, c), gather_tokens(k4, keys), gather_tokens(v4, keys)
        if routing is None:
            out = attention_fn(qs, kk, vv, heads, **attn_kwargs)
        else:
            attend = own_then_extra(qs, kk, vv, heads, attention_fn, n, **attn_kwargs)
            out = routed_attention(attend, keys[:, n:], routing, sl, g)
        return out.reshape(g, -1, n, c)

    if r == 0:
        return part(slice(0, b), plan.all_keys).reshape(rows, n, c)

    out = torch.cat((part(slice(0, r), plan.ref_keys), part(slice(r, b), plan.story_keys)), dim=1)
    return out.reshape(rows, n, c)


def routed_attention(attend: Callable[[torch.Tensor | None], torch.Tensor], extra: torch.Tensor, routing: Routing,
                     images: slice, chunks: int, token_dim: int = 1) -> torch.Tensor:
    """Subject-masked attention of the T images ``images`` of a group, for ``chunks`` chunks G (rows ``chunk * T +
    image``): :func:`slot_attention` with the extra keys ``extra`` ``(T, E)`` (flat indices into the group's image
    tokens, as the plan's) visible to a slot where they lie in its character's region (:func:`region_visible`).
    ``attend`` as in :func:`slot_attention`, over the G * T rows."""
    visible = region_visible(routing, extra, images).repeat(chunks, 1, 1)
    return slot_attention(attend, visible, routing.query_slot[images].repeat(chunks, 1), token_dim)


def region_visible(routing: Routing, extra: torch.Tensor, images: slice) -> torch.Tensor:
    """bool ``(T, K, E)``: extra token e (``extra`` ``(T, E)``, flat indices into the group's tokens) of image
    ``images[t]`` lies in the region of the character of its slot k (False for padding slots)."""
    slots = routing.slots[images]  # (T, K)
    inside = routing.member[extra].gather(2, slots.clamp_min(0)[:, None].expand(-1, extra.shape[1], -1))
    return (inside & (slots >= 0)[:, None]).transpose(1, 2)


def slot_attention(attend: Callable[[torch.Tensor | None], torch.Tensor], visible: torch.Tensor,
                   query_slot: torch.Tensor, token_dim: int = 1) -> torch.Tensor:
    """Attention where each query reads its row's own keys and the extra keys of its slot (subject masks, issue 10).

    ``attend(seen)`` runs the R rows' queries over their own keys then their E extra keys, ``seen`` bool ``(R, E)``
    telling which extra keys each row may see (its own keys always visible: use :func:`restrict`), or over the
    own keys alone when ``seen`` is None; its result has the N queries on ``token_dim``. ``visible`` bool ``(R, K,
    E)``: extra key e is visible to slot k of row r; ``query_slot`` long ``(R, N)``: the slot each query reads, -1
    for none (its own keys only). One call per slot with a KEY mask (no per-query mask, no row fully masked),
    each query taking its slot's result; with K >= 2 slots one more call over the own keys serves the queries of
    no slot. Returns what ``attend`` returns.
    """
    out = None
    for s in range(visible.shape[1]):
        res = attend(visible[:, s])
        out = res if out is None else torch.where(_per_query(query_slot == s, res, token_dim), res, out)
    if visible.shape[1] > 1:
        res = attend(None)
        out = torch.where(_per_query(query_slot < 0, res, token_dim), res, out)
    return out


def _per_query(pick: torch.Tensor, like: torch.Tensor, token_dim: int) -> torch.Tensor:
    """``pick`` bool ``(R, N)`` shaped to broadcast over ``like``'s rows and its queries on ``token_dim``."""
    shape = [1] * like.ndim
    shape[0], shape[token_dim] = pick.shape
    return pick.reshape(shape)


def restrict(mask: torch.Tensor | None, own: int, seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask over ``own`` + E keys: the own keys visible, extra key e where ``seen`` bool ``(rows, E)``
    holds. Additive ``[rows, 1, 1, own + E]`` of ``dtype`` (0 or -inf) without ``mask``, else the 4-D ``mask`` over
    those keys (:func:`joint_mask`, additive or boolean) with the unseen ones hidden as well."""
    seen = torch.cat((torch.ones(seen.shape[0], own, dtype=torch.bool, device=seen.device), seen), 1)
    hidden = ~seen[:, None, None]
    if mask is None:
        return torch.zeros(hidden.shape, dtype=dtype, device=seen.device).masked_fill_(hidden, float("-inf"))
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return torch.where(hidden, torch.full((), float("-inf"), dtype=mask.dtype, device=mask.device), mask)


def naive_consistent_self_attention(q, k, v, heads, plan: SamplingPlan, attention_fn: AttentionFn = sdpa_attention):
    """Reference implementation: a Python loop over images building P_i one at a time.

    Same semantics as :func:`consistent_self_attention`; kept for tests and the benchmark only.
    """
    rows, n, c = q.shape
    b = plan.num_images
    g = rows // b
    q4, k4, v4 = (t.reshape(g, b, n, c) for t in (q, k, v))
    outs = []
    for chunk in range(g):
        kf, vf = k4[chunk].reshape(b * n, c), v4[chunk].reshape(b * n, c)
        for i in range(b):
            if plan.per_source == 0:
                idx = torch.empty(0, dtype=torch.long, device=q.device)
            elif plan.ref_count == 0:
                idx = plan.all_idx[i]
            elif i < plan.ref_count:
                idx = plan.ref_idx[i]
            else:
                idx = plan.story_idx[i - plan.ref_count]
            kk = torch.cat((k4[chunk, i], kf[idx]), 0)[None]
            vv = torch.cat((v4[chunk, i], vf[idx]), 0)[None]
            outs.append(attention_fn(q4[chunk, i][None], kk, vv, heads))
    return torch.cat(outs, 0)


def joint_consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SamplingPlan,
                               image_span: tuple[int, int], attention_fn: Callable[..., torch.Tensor],
                               mask: torch.Tensor | None = None, token_dim: int = 1,
                               routing: Routing | None = None) -> torch.Tensor:
    """CSA in a DiT's joint attention (text, image and appended tokens in one sequence), for ``G`` chunks of one
    group of B images sharing one plan.

    q, k, v: ``[G * B, heads, N, D]`` (ComfyUI's ``skip_reshape`` layout, after RoPE), ``row = chunk * B + image``;
    ``image_span`` = (start, stop): the image tokens of every row, ``stop - start == plan.num_tokens``. The image
    queries of image i attend to its own N tokens plus the image tokens the plan samples from the other images of
    its chunk (the plan's indices are flat into the chunk's ``B * (stop - start)`` image tokens); every other query
    (text, appended reference tokens) attends to its own row only. Shared keys are gathered straight from the
    head layout, once, into the extended key tensor.

    ``attention_fn(q, k, v, mask)`` is the model's attention on that layout; its output has the query tokens on
    ``token_dim`` (1 for ``[rows, N, heads * D]``, 2 for ``[rows, heads, N, D]``). ``mask``: None, or an additive
    (float) or boolean mask, read as ComfyUI's attention reads it: ``[N, N]`` or 4-D broadcastable to ``[rows,
    heads, N, N]``, or 3-D ``[rows, N or 1, N]`` (no head axis); the extra keys are always visible. ``routing``:
    subject masks (:class:`Routing` over the image tokens, the same for every chunk; :func:`routed_attention`: the
    image queries see only the extra tokens in their routed character's region, still under ``mask``), or None to
    share whole images. Returns what ``attention_fn`` returns for the whole sequence. Rate 0 or B = 1: one plain call.
    """
    rows, h, n, d = q.shape
    b, (s, e) = plan.num_images, image_span
    if plan.per_source == 0 or b == 1:
        return attention_fn(q, k, v, mask)
    if rows % b or e - s != plan.num_tokens or e > n or k.shape[2] != n:
        raise ValueError(f"CSA: q {tuple(q.shape)} / k {tuple(k.shape)} with image tokens {s}:{e} do not fit a plan "
                         f"for {b} images x {plan.num_tokens} tokens")
    g = rows // b
    mask = joint_mask(mask)
    out = attend_outside(q, k, v, image_span, attention_fn, mask, token_dim)
    q5, k5, v5 = (t.reshape(g, b, h, n, d) for t in (q, k, v))
    r = plan.ref_count
    parts = ((slice(0, b), plan.all_idx),) if r == 0 else ((slice(0, r), plan.ref_idx), (slice(r, b), plan.story_idx))
    for images, idx in parts:
        source, token = idx // (e - s), s + idx % (e - s)
        kk, vv = (_joint_keys(t5, images, source, token) for t5 in (k5, v5))
        count = kk.shape[0] // g
        part_mask = None if mask is None else _image_mask(mask, g, b, images, s, e, idx.shape[1])
        qq = q5[:, images, :, s:e].reshape(g * count, h, e - s, d)
        if routing is None:
            res = attention_fn(qq, kk, vv, part_mask)
        else:
            res = routed_attention(joint_attend(qq, kk, vv, attention_fn, part_mask, n), idx, routing, images, g,
                                   token_dim)
        out = joint_output(res, rows, n, token_dim) if out is None else out
        out.reshape(g, b, *out.shape[1:])[:, images].narrow(token_dim + 1, s, e - s).copy_(
            res.reshape(g, count, *res.shape[1:]))
    return out


def own_then_extra(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads, attention_fn: AttentionFn, own: int,
                   **attn_kwargs) -> Callable[[torch.Tensor | None], torch.Tensor]:
    """:func:`slot_attention`'s ``attend(seen)`` on ``[rows, tokens, heads * dim_head]``: queries ``q`` over keys
    and values ``[rows, own + E, C]`` (each row's own tokens, then E extra tokens) through ``attention_fn(q, k, v,
    heads, mask=...)``; ``seen`` None: the own keys alone."""
    def attend(seen):
        if seen is None:
            return attention_fn(q, k[:, :own], v[:, :own], heads, **attn_kwargs)
        return attention_fn(q, k, v, heads, mask=restrict(None, own, seen, q.dtype), **attn_kwargs)
    return attend


def joint_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_fn: Callable[..., torch.Tensor],
                 mask: torch.Tensor | None, own: int) -> Callable[[torch.Tensor | None], torch.Tensor]:
    """:func:`slot_attention`'s ``attend(seen)`` in a joint attention: queries ``q`` ``[rows, heads, Nq, D]`` over keys
    and values ``[rows, heads, own + E, D]`` (each row's own joint sequence, then E extra tokens), ``attention_fn(q,
    k, v, mask)`` as in :func:`joint_consistent_attention`, ``mask`` None or 4-D over the ``own + E`` keys (the model's
    mask still applies to the own keys); ``seen`` None: the own keys alone."""
    def attend(seen):
        if seen is None:
            return attention_fn(q, k[:, :, :own], v[:, :, :own], None if mask is None else mask[..., :own])
        return attention_fn(q, k, v, restrict(mask, own, seen, q.dtype))
    return attend


def _joint_keys(x5: torch.Tensor, images: slice, source: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``[G * T, heads, N + E, D]``: rows ``images`` of x5 ``[G, B, heads, N, D]``, each followed by the E tokens
    ``(source, token)`` (``[T, E]`` each) of its chunk, gathered in one indexing."""
    g, _, h, n, d = x5.shape
    t, extra = source.shape
    out = x5.new_empty(g, t, h, n + extra, d)
    out[..., :n, :] = x5[:, images]
    out[..., n:, :] = x5[:, source, :, token].permute(2, 0, 3, 1, 4)  # indexing puts [T, E] first
    return out.reshape(g * t, h, n + extra, d)


def _image_mask(mask: torch.Tensor, g: int, b: int, images: slice, s: int, e: int, extra: int) -> torch.Tensor:
    """The 4-D ``mask`` for the image queries of rows ``images`` of every chunk, with ``extra`` visible keys."""
    if mask.shape[0] != 1:
        mask = mask.reshape(g, b, *mask.shape[1:])[:, images].reshape(-1, *mask.shape[1:])
    return image_query_mask(mask, s, e, extra)


def joint_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI's attention mask layouts (``[Nq, Nk]`` for all rows, ``[rows, Nq, Nk]`` as Qwen-Image's text
    padding, or 4-D) as 4-D ``[rows or 1, heads or 1, Nq or 1, Nk]``; None stays None."""
    if mask is None:
        return None
    return mask.unsqueeze(1) if mask.ndim == 3 else mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def image_query_mask(mask: torch.Tensor, s: int, e: int, extra: int) -> torch.Tensor:
    """A 4-D :func:`joint_mask` (its rows already those of the queries) for the image queries ``s:e``, with
    ``extra`` keys appended that every query sees."""
    if mask.shape[2] != 1:
        mask = mask[:, :, s:e]
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat((mask, visible(*mask.shape[:3], extra, dtype=mask.dtype, device=mask.device)), -1)


def joint_output(part: torch.Tensor, rows: int, n: int, token_dim: int) -> torch.Tensor:
    """An empty output for ``rows`` rows of ``n`` query tokens shaped like an attention result ``part``."""
    shape = list(part.shape)
    shape[0], shape[token_dim] = rows, n
    return part.new_empty(shape)


def attend_outside(q, k, v, image_span: tuple[int, int], attention_fn, mask, token_dim: int) -> torch.Tensor | None:
    """The joint attention of every query OUTSIDE ``image_span`` (text, appended reference or padding tokens) over
    its own row only, in one call, written into an output for the whole sequence (its image part left to fill);
    None when the image tokens are the whole sequence. Arguments as :func:`joint_consistent_attention`, ``mask``
    already 4-D (:func:`joint_mask`)."""
    n = q.shape[2]
    s, e = image_span
    if s == 0 and e == n:
        return None
    rest = [(0, s)] + ([(e, n)] if e < n else [])
    pick = (lambda t: t[:, :, :s]) if e == n else (lambda t: torch.cat([t[:, :, a:z] for a, z in rest], 2))
    plain = attention_fn(pick(q), k, v, mask if mask is None or mask.shape[2] == 1 else pick(mask))
    out, done = joint_output(plain, q.shape[0], n, token_dim), 0
    for a, z in rest:
        out.narrow(token_dim, a, z - a).copy_(plain.narrow(token_dim, done, z - a))
        done += z - a
    return out