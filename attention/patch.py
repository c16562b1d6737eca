"""Consistent Self-Attention inside ComfyUI: attn1 replace patches on a ModelPatcher clone.

Works on every UNet whose transformer blocks are ComfyUI's ``BasicTransformerBlock`` (SD1.x, SD2.x, SDXL and
their fine-tunes/LoRAs). The patch receives projected q/k/v, so shared tokens are never re-projected, and
finds everything it needs in ``extra_options`` (ComfyUI's transformer_options):

- rows: ``original_shape[0]`` rows = ``len(cond_or_uncond)`` chunks x B images, ``row = chunk * B + image``.
  One call may hold both CFG halves, one half (memory split), one chunk (cfg = 1) or several positive chunks:
  each chunk's B images form the group, and all chunks share one sampling plan. Rows that do not match
  ``original_shape`` (temporal layouts such as SVD's) are left to plain attention.
- step: the position of the current sigma in ``sample_sigmas`` (nearest entry), never a call counter, so
  multi-evaluation samplers, split calls and re-runs see the same step.
- resolution: the layer's downsampling factor, from the latent size and the token count.
- context windows: core ``context_window.index_list`` or AnimateDiff-Evolved ``ad_params['sub_idxs']`` give
  the absolute image indices of the rows, so reference images are recognised inside a window.

No state outside the patch closure; the closure keeps a small memo of sampling plans keyed by everything
they depend on (seed, step, resolution, group shape), so a result never depends on what ran before.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModelError
from .csa import consistent_self_attention, make_plan

BLOCK_CHOICES = {
    "decoder": ("output",),
    "decoder + middle": ("middle", "output"),
    "encoder + decoder": ("input", "output"),
    "all": ("input", "middle", "output"),
}
SCHEDULE_CHOICES = ("always", "storydiffusion")
_BLOCK_IDS = {"input": 1, "middle": 2, "output": 3}


@dataclass(frozen=True)
class CSASettings:
    """What the SDN_ConsistentSelfAttention node configures.

    rates: sampling rate by image-level downsampling factor of the layer (8, 16, 32; coarser layers use the
    1/32 rate). reference_count: R (0 = all-to-all). seed: sampling seed. blocks: ComfyUI block names to patch.
    sigma_start / sigma_end: CSA is active while ``sigma_end <= sigma <= sigma_start``.
    schedule: "always", or "storydiffusion" (the reference app: plain attention at step 0, then each layer call
    skips CSA with probability 0.3 for steps 1..19 and 0.1 from step 20, deterministic per seed).
    """

    rates: tuple[tuple[int, float], ...] = ((8, 0.5), (16, 0.5), (32, 0.5))
    reference_count: int = 0
    seed: int = 0
    blocks: tuple[str, ...] = ("output",)
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    schedule: str = "always"

    def rate_for(self, factor: int) -> float:
        rates = dict(self.rates)
        if factor in rates:
            return rates[factor]
        coarsest = max(rates)
        return rates[coarsest] if factor > coarsest else 0.0


def attention_blocks(model_patcher) -> list[tuple[str, int, int]]:
    """List ``(block_name, number, depth_index)`` of every self-attention transformer block of a UNet.

    Raises UnsupportedModelError for models without ComfyUI UNet transformer blocks (DiTs such as Flux, SD3).
    """
    from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer

    unet = model_patcher.get_model_object("diffusion_model")
    found = []
    for name, attr in (("input", "input_blocks"), ("middle", "middle_block"), ("output", "output_blocks")):
        blocks = getattr(unet, attr, None)
        if blocks is None:
            continue
        seq = [blocks] if name == "middle" else list(blocks)
        for number, block in enumerate(seq):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    for depth, tb in enumerate(module.transformer_blocks):
                        if isinstance(tb, BasicTransformerBlock):
                            found.append((name, number, depth))
    if not found:
        raise UnsupportedModelError(
            f"SDN_ConsistentSelfAttention: input 'model': expected a UNet model with self-attention blocks "
            f"(SD1.x, SD2.x, SDXL and their derivatives), got {type(unet).__name__}, which has none "
            f"(DiT models such as Flux or SD3 are not supported).")
    return found


@dataclass
class _PlanMemo:
    """Memo of SamplingPlans: a pure cache (plans are a deterministic function of their key)."""

    limit: int = 16
    plans: OrderedDict = field(default_factory=OrderedDict)

    def get(self, key, build):
        plan = self.plans.get(key)
        if plan is None:
            plan = build()
            self.plans[key] = plan
            while len(self.plans) > self.limit:
                self.plans.popitem(last=False)
        return plan


def step_index(extra_options) -> tuple[int | None, float]:
    """(step, sigma) of this model call: the nearest entry of ``sample_sigmas`` (None when absent)."""
    sigmas = extra_options.get("sigmas")
    sigma = float(sigmas.max()) if sigmas is not None else 0.0
    schedule = extra_options.get("sample_sigmas")
    if schedule is None or len(schedule) < 2:
        return None, sigma
    steps = schedule[:-1].float().cpu()
    return int(torch.argmin((steps - sigma).abs())), sigma


def _mix(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (not hash(): str hashes change per process)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def window_indices(extra_options, batch: int) -> list[int] | None:
    """Absolute image indices of the B rows of a chunk when a context window sliced the batch, else None."""
    ad = extra_options.get("ad_params")
    if isinstance(ad, dict) and ad.get("sub_idxs") is not None and len(ad["sub_idxs"]) == batch:
        return [int(i) for i in ad["sub_idxs"]]
    cw = extra_options.get("context_window")
    idx = getattr(cw, "index_list", None)
    if idx is not None and len(idx) == batch:
        return [int(i) for i in idx]
    return None


class _CSALayer:
    """The attn1 replace of one layer: ``f(q, k, v, extra_options) -> out``.

    ``previous``: an attn1 replace already on the model for this key; it is called with the extended keys so
    patches compose. Layers sharing one ``memo`` share plans.
    """

    def __init__(self, settings: CSASettings, previous, memo: _PlanMemo):
        self.settings, self.previous, self.memo = settings, previous, memo

    # ModelPatcher.clone() deep-copies model_options: share, don't copy (the memo is a pure cache).
    def __deepcopy__(self, memo):
        return self

    def _attention(self, q, k, v, heads, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        import comfy.ldm.modules.attention as comfy_attention

        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)

    def plan_for(self, extra_options, rows: int, tokens: int, device: torch.device):
        """``((plan, row_order), B)`` for this call; ``(None, B)`` when CSA does not apply (plain attention)."""
        s = self.settings
        shape = extra_options.get("original_shape")
        chunks = len(extra_options.get("cond_or_uncond") or [0])
        if shape is None or rows != shape[0] or rows % chunks:
            return None, 0  # temporal layout or unknown row structure: leave it alone
        batch = rows // chunks
        if batch < 2:
            return None, batch
        step, sigma = step_index(extra_options)
        if not (s.sigma_end <= sigma <= s.sigma_start):
            return None, batch
        h, w = shape[-2], shape[-1]
        factor = 8 * max(1, round(math.sqrt(h * w / tokens)))
        rate = s.rate_for(factor)
        if rate <= 0.0:
            return None, batch
        step_key = step if step is not None else int(sigma * 1e6)  # no schedule: key by sigma
        if s.schedule == "storydiffusion" and step is not None:
            if step == 0:
                return None, batch
            block = extra_options.get("block") or ("", 0)
            layer = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
            rng = random.Random(_mix(s.seed, step, _BLOCK_IDS.get(layer[0], 0), layer[1], layer[2]))
            if rng.random() < (0.3 if step < 20 else 0.1):
                return None, batch
        absolute = window_indices(extra_options, batch)
        refs = s.reference_count
        order = None
        if absolute is not None and refs > 0:
            ref_pos = [p for p, a in enumerate(absolute) if a < refs]
            refs = len(ref_pos)
            if refs and ref_pos != list(range(refs)):
                order = ref_pos + [p for p in range(batch) if p not in ref_pos]
        key = (step_key, tokens, batch, refs, rate, tuple(absolute) if absolute else None, str(device))

        def build():
            gen = torch.Generator().manual_seed(_mix(s.seed, step_key, tokens, batch, refs))
            return make_plan(batch, tokens, rate, refs, gen).to(device), order

        plan, order = self.memo.get(key, build)
        return (plan, order), batch

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        found, batch = self.plan_for(extra_options, q.shape[0], q.shape[1], q.device)
        if found is None:
            return self._attention(q, k, v, heads, extra_options)
        plan, order = found
        fn = lambda qq, kk, vv, h, **_: self._attention(qq, kk, vv, h, extra_options)  # noqa: E731
        if order is None:
            return consistent_self_attention(q, k, v, heads, plan, attention_fn=fn)
        # References are not the first rows of this window: permute rows so they are, then undo.
        rows, n, c = q.shape
        perm = torch.tensor(order, device=q.device)
        inv = torch.argsort(perm)
        p = lambda t: t.reshape(-1, batch, n, c)[:, perm].reshape(rows, n, c)  # noqa: E731
        out = consistent_self_attention(p(q), p(k), p(v), heads, plan, attention_fn=fn)
        return out.reshape(-1, batch, n, c)[:, inv].reshape(rows, n, c)


def apply_csa(model_patcher, settings: CSASettings):
    """Return a clone of ``model_patcher`` with CSA on the self-attention of ``settings.blocks``.

    One memo is shared by all layers (plans are per resolution and step, not per layer). Existing attn1
    replace patches on the same keys are kept and called with the extended keys. Raises
    UnsupportedModelError for models without UNet transformer blocks.
    """
    blocks = attention_blocks(model_patcher)
    m = model_patcher.clone()
    memo = _PlanMemo()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for name, number, depth in blocks:
        if name not in settings.blocks:
            continue
        key3, key2 = (name, number, depth), (name, number)
        previous = existing.get(key3, existing.get(key2))
        m.set_model_attn1_replace(_CSALayer(settings, previous, memo), name, number, depth)
    return m
