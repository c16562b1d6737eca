"""Consistent Self-Attention inside ComfyUI: attn1 replace patches on a ModelPatcher clone.

Works on every UNet whose transformer blocks are ComfyUI's ``BasicTransformerBlock`` (SD1.x, SD2.x, SDXL and
their fine-tunes/LoRAs). The patch receives projected q/k/v, so shared tokens are never re-projected, and
finds everything it needs in ``extra_options`` (ComfyUI's transformer_options):

- rows: ``original_shape[0]`` rows = ``len(cond_or_uncond)`` chunks x B images, ``row = chunk * B + image``.
  One call may hold both CFG halves, one half (memory split), one chunk (cfg = 1) or several positive chunks:
  each chunk's B images form the group, and all chunks share one sampling plan. Rows that do not match
  ``original_shape`` (an unknown layout) are left to plain attention; video UNets (SVD) are refused up front.
- step: the position of the current sigma in ``sample_sigmas`` (nearest entry), never a call counter, so
  multi-evaluation samplers, split calls and re-runs see the same step.
- resolution: the layer's downsampling factor, from the block's place in the UNet (:func:`attention_blocks`),
  so odd latent sizes cannot put a layer in the wrong bucket.
- context windows: :func:`.frames.window_frames` gives the absolute image indices of the rows (core context
  windows with or without their causal anchor frame, AnimateDiff-Evolved ``ad_params``), so reference images
  are recognised inside a window.

Three roles share one layer class: plain CSA; recording a character bank (write phase, see bank.py); reading
banks (read phase). No state outside the patch objects; they keep memos of sampling plans and of the current
step's bank tensors on the device, keyed by everything they depend on, so a result never depends on what ran
before.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModelError
from .bank import BankMismatchError, BankRecorder, CharacterBank, layer_name, schedule_key
from .csa import attend_with_extra, consistent_self_attention, make_plan, tokens_per_source
from .frames import window_frames

BLOCK_CHOICES = {
    "decoder": ("output",),
    "decoder + middle": ("middle", "output"),
    "encoder + decoder": ("input", "output"),
    "all": ("input", "middle", "output"),
}
SCHEDULE_CHOICES = ("always", "storydiffusion")
_BLOCK_IDS = {"input": 1, "middle": 2, "output": 3}
NODE = "SDN_ConsistentSelfAttention"


@dataclass(frozen=True)
class CSASettings:
    """What the SDN_ConsistentSelfAttention node configures.

    rates: sampling rate by image-level downsampling factor of the layer (8, 16, 32; coarser layers use the
    1/32 rate). reference_count: R (0 = all-to-all). seed: sampling seed. blocks: ComfyUI block names to patch.
    sigma_start / sigma_end: CSA is active while ``sigma_end <= sigma <= sigma_start``.
    schedule: "always", or "storydiffusion" (the reference app: plain attention at step 0, then each layer call
    skips CSA with probability 0.3 for steps 1..19 and 0.1 from step 20, deterministic per seed).
    tile_size: 0 = off; T > 1 = each image shares only with the T - 1 images around it (sliding window).
    """

    rates: tuple[tuple[int, float], ...] = ((8, 0.5), (16, 0.5), (32, 0.5))
    reference_count: int = 0
    seed: int = 0
    blocks: tuple[str, ...] = ("output",)
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    schedule: str = "always"
    tile_size: int = 0

    def rate_for(self, factor: int) -> float:
        rates = dict(self.rates)
        if factor in rates:
            return rates[factor]
        coarsest = max(rates)
        return rates[coarsest] if factor > coarsest else 0.0

    def as_dict(self) -> dict:
        return {"rates": [list(r) for r in self.rates], "reference_count": self.reference_count, "seed": self.seed,
                "blocks": list(self.blocks), "sigma_start": self.sigma_start if math.isfinite(self.sigma_start)
                else "inf", "sigma_end": self.sigma_end, "schedule": self.schedule, "tile_size": self.tile_size}


def attention_blocks(model_patcher, node: str = NODE) -> dict[tuple[str, int, int], int]:
    """Map ``(block_name, number, depth_index)`` of every self-attention transformer block of an image UNet to
    its image-level downsampling factor (8 = the latent's own resolution, then 16, 32, 64).

    The factor follows the UNet's structure, not token counts (odd latent sizes round differently at every
    level): walking input blocks, middle block and output blocks in order, each Downsample halves the
    resolution and each Upsample doubles it (SD1.x/SD2.x: input 1,2 / 4,5 / 7,8 at 8 / 16 / 32, middle 64,
    output 3-5 / 6-8 / 9-11 at 32 / 16 / 8; SDXL: input 4,5 / 7,8 at 16 / 32, middle 32, output 0-2 / 3-5 at
    32 / 16). Raises UnsupportedModelError naming ``node`` for models without ComfyUI UNet transformer blocks
    (DiTs such as Flux, SD3) and for video UNets with temporal layers (Stable Video Diffusion).
    """
    from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = model_patcher.get_model_object("diffusion_model")
    expected = f"{node}: input 'model': expected an image UNet with self-attention blocks (SD1.x, SD2.x, SDXL " \
               f"and their derivatives), got {type(unet).__name__}"
    if is_video_unet(unet):
        raise UnsupportedModelError(f"{expected} with temporal layers (a video model such as Stable Video "
                                    f"Diffusion, whose frames must not be mixed by image self-attention)")
    found, level = {}, 0
    for name, attr in (("input", "input_blocks"), ("middle", "middle_block"), ("output", "output_blocks")):
        blocks = getattr(unet, attr, None)
        if blocks is None:
            continue
        for number, block in enumerate([blocks] if name == "middle" else blocks):
            for module in block:  # a Downsample/Upsample inside a ResBlock (resblock_updown) counts too
                if any(isinstance(m, Downsample) for m in module.modules()):
                    level += 1
                elif any(isinstance(m, Upsample) for m in module.modules()):
                    level -= 1
                elif isinstance(module, SpatialTransformer):
                    if level < 0:
                        raise UnsupportedModelError(f"{expected}, whose block {name} {number} is upsampled more "
                                                    f"often than it was downsampled")
                    for depth, tb in enumerate(module.transformer_blocks):
                        if isinstance(tb, BasicTransformerBlock):
                            found[(name, number, depth)] = 8 << level
    if not found:
        raise UnsupportedModelError(f"{expected}, which has none (DiT models such as Flux or SD3 are not supported).")
    return found


def is_video_unet(unet) -> bool:
    """True for a UNet with temporal layers (Stable Video Diffusion's spatial + temporal transformers and
    temporal res blocks). AnimateDiff's motion modules are other modules and do not count."""
    from comfy.ldm.modules.attention import SpatialVideoTransformer

    return bool(getattr(unet, "use_temporal_resblocks", False)) or any(
        isinstance(m, SpatialVideoTransformer) for m in unet.modules())


@dataclass
class _Memo:
    """A bounded pure cache: values are a deterministic function of their key."""

    limit: int = 16
    items: OrderedDict = field(default_factory=OrderedDict)

    def get(self, key, build):
        value = self.items.get(key)
        if value is None:
            value = build()
            self.items[key] = value
            while len(self.items) > self.limit:
                self.items.popitem(last=False)
        return value


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


@dataclass(frozen=True)
class _Call:
    """What one layer call is: its group shape, step and whether CSA applies."""

    batch: int
    chunks: tuple
    step: int | None
    step_key: int
    rate: float
    active: bool
    layer: str
    latent_hw: tuple
    absolute: list | None


@dataclass
class BankReader:
    """Read-phase configuration shared by all layers of one patched model.

    banks: the character banks. routing: per absolute image index of the read batch, the indices of the banks
    that image reads (None: every image reads every bank). share: images of a read batch also share among
    themselves with CSA (the model's CSA settings).
    """

    banks: tuple
    routing: tuple | None = None
    share: bool = False
    step_cache: _Memo = field(default_factory=lambda: _Memo(limit=4))

    def __deepcopy__(self, memo):
        return self

    def banks_for(self, image: int) -> tuple:
        if self.routing is None:
            return tuple(range(len(self.banks)))
        if image >= len(self.routing):
            raise BankMismatchError(
                f"the story routes character banks for {len(self.routing)} panels, but the latent batch has "
                f"more images (image {image + 1}). Use the story's panel_count as the batch size.")
        return self.routing[image]

    def step_entries(self, bank_index: int, step: int, device, dtype) -> dict:
        """All of one bank's entries of one step on the compute device: one transfer per step."""
        bank: CharacterBank = self.banks[bank_index]

        def build():
            return {(layer, half): (k.to(device, dtype, non_blocking=True), v.to(device, dtype, non_blocking=True))
                    for (s, layer, half), (k, v) in bank.entries.items() if s == step}
        return self.step_cache.get((bank_index, step, str(device), dtype), build)


class _CSALayer:
    """The attn1 replace of one layer: ``f(q, k, v, extra_options) -> out`` (ComfyUI's replace signature).

    ``previous``: an attn1 replace already on the model for this key; it is called with the extended keys so
    patches compose. Layers sharing one ``memo`` share sampling plans. ``factor``: the layer's image-level
    downsampling factor (from :func:`attention_blocks`), which selects its rate. ``recorder``: write phase.
    ``reader``: read phase.
    """

    def __init__(self, settings: CSASettings, previous, memo: _Memo, factor: int,
                 recorder: BankRecorder | None = None, reader: BankReader | None = None, enabled: bool = True):
        self.settings, self.previous, self.memo, self.factor = settings, previous, memo, factor
        self.recorder, self.reader, self.enabled = recorder, reader, enabled

    # ModelPatcher.clone() deep-copies model_options: share, don't copy (the memos are pure caches).
    def __deepcopy__(self, memo):
        return self

    def derive(self, **changes) -> "_CSALayer":
        fields = dict(settings=self.settings, previous=self.previous, memo=self.memo, factor=self.factor,
                      recorder=self.recorder, reader=self.reader, enabled=self.enabled)
        fields.update(changes)
        return _CSALayer(**fields)

    def _attention(self, q, k, v, heads, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        import comfy.ldm.modules.attention as comfy_attention

        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)

    def describe(self, extra_options, rows: int) -> _Call | None:
        """Classify this call; None when the rows are not a (chunks x images) layout (e.g. temporal attention)."""
        s = self.settings
        shape = extra_options.get("original_shape")
        chunks = tuple(extra_options.get("cond_or_uncond") or [0])
        if shape is None or rows != shape[0] or rows % len(chunks):
            return None
        batch = rows // len(chunks)
        step, sigma = step_index(extra_options)
        h, w = shape[-2], shape[-1]
        rate = s.rate_for(self.factor)
        block = extra_options.get("block") or ("", 0)
        block_index = int(extra_options.get("block_index", 0))
        active = self.enabled and rate > 0.0 and s.sigma_end <= sigma <= s.sigma_start
        if active and s.schedule == "storydiffusion" and step is not None:
            if step == 0:
                active = False
            else:
                rng = random.Random(_mix(s.seed, step, _BLOCK_IDS.get(block[0], 0), int(block[1]), block_index))
                active = rng.random() >= (0.3 if step < 20 else 0.1)
        step_key = step if step is not None else int(sigma * 1e6)  # no schedule: key by sigma
        return _Call(batch, chunks, step, step_key, rate, active, layer_name(block, block_index), (h, w),
                     window_frames(extra_options, batch, NODE))

    def plan(self, call: _Call, tokens: int, device, refs: int | None = None):
        """(plan, row_order) shared by all layers of this resolution and step; None when CSA is off here."""
        if not call.active or call.batch < 2:
            return None
        s = self.settings
        refs = s.reference_count if refs is None else refs
        order = None
        if call.absolute is not None and refs > 0:
            ref_pos = [p for p, a in enumerate(call.absolute) if a < refs]
            refs = len(ref_pos)
            if refs and ref_pos != list(range(refs)):
                order = ref_pos + [p for p in range(call.batch) if p not in ref_pos]
        key = ("csa", call.step_key, tokens, call.batch, refs, call.rate, s.tile_size,
               tuple(call.absolute) if call.absolute else None, str(device))

        def build():
            gen = torch.Generator().manual_seed(_mix(s.seed, call.step_key, tokens, call.batch, refs))
            return make_plan(call.batch, tokens, call.rate, refs, gen, tile_size=s.tile_size).to(device), order
        return self.memo.get(key, build)

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        call = self.describe(extra_options, q.shape[0])
        if call is None:
            return self._attention(q, k, v, heads, extra_options)
        if self.reader is not None:
            return self._read(q, k, v, heads, extra_options, call)
        found = self.plan(call, q.shape[1], q.device)
        out = self._csa(q, k, v, heads, extra_options, call, found)
        if self.recorder is not None and call.active:
            self._record(k, v, extra_options, call)
        return out

    def _csa(self, q, k, v, heads, extra_options, call, found):
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
        p = lambda t: t.reshape(-1, call.batch, n, c)[:, perm].reshape(rows, n, c)  # noqa: E731
        out = consistent_self_attention(p(q), p(k), p(v), heads, plan, attention_fn=fn)
        return out.reshape(-1, call.batch, n, c)[:, inv].reshape(rows, n, c)

    # -- write phase ---------------------------------------------------------------------------------------
    def bank_indices(self, call: _Call, tokens: int, device) -> torch.Tensor:
        """Flat indices (B * M) of the tokens of each reference image that go into the bank at this step."""
        s = self.settings
        m = tokens_per_source(tokens, call.rate)

        def build():
            gen = torch.Generator().manual_seed(_mix(s.seed, call.step_key, tokens, call.batch, 0xBA4C))
            picked = torch.rand(call.batch, tokens, generator=gen).topk(m, dim=-1, sorted=False).indices
            return (picked + torch.arange(call.batch)[:, None] * tokens).reshape(-1).to(device)
        return self.memo.get(("bank", call.step_key, tokens, call.batch, m, str(device)), build)

    def _record(self, k, v, extra_options, call: _Call):
        schedule = extra_options.get("sample_sigmas")
        if schedule is None or call.step is None:
            raise BankMismatchError("recording a character bank needs a sampler that sets sample_sigmas "
                                    "(every stock KSampler does)")
        if call.absolute is not None:
            raise BankMismatchError("recording a character bank does not support context windows: sample the "
                                    "reference images in one batch")
        rows, n, c = k.shape
        idx = self.bank_indices(call, n, k.device)
        k3, v3 = k.reshape(len(call.chunks), call.batch * n, c), v.reshape(len(call.chunks), call.batch * n, c)
        seen = set()
        for g, half in enumerate(call.chunks):
            if half in seen:  # several positive entries: the first one's tokens represent the half
                continue
            seen.add(half)
            self.recorder.record((call.step, call.layer, int(half)), k3[g, idx], v3[g, idx],
                                 schedule_key(schedule), call.latent_hw, call.batch)

    # -- read phase ----------------------------------------------------------------------------------------
    def _read(self, q, k, v, heads, extra_options, call: _Call):
        reader = self.reader
        schedule = extra_options.get("sample_sigmas")
        if schedule is None or call.step is None:
            raise BankMismatchError("reading character banks needs a sampler that sets sample_sigmas "
                                    "(every stock KSampler does)")
        sched = schedule_key(schedule)
        for bank in reader.banks:
            bank.check_schedule(sched, call.latent_hw)
        rows, n, c = q.shape
        b = call.batch
        absolute = call.absolute or list(range(b))
        # Optional CSA among the read batch: its extra tokens per row, from the same plan as plain CSA.
        csa_k = csa_v = None
        if reader.share:
            found = self.plan(call, n, q.device, refs=0)
            if found is not None:
                idx = found[0].all_idx
                k3, v3 = k.reshape(-1, b * n, c), v.reshape(-1, b * n, c)
                csa_k, csa_v = k3[:, idx].reshape(rows, -1, c), v3[:, idx].reshape(rows, -1, c)
        # Bank tokens per row: the banks of the row's panel, for this step, layer and CFG half.
        per_row_k, per_row_v = [], []
        for g, half in enumerate(call.chunks):
            for i in range(b):
                ks, vs = [], []
                for j in reader.banks_for(absolute[i]):
                    entry = reader.step_entries(j, call.step, q.device, k.dtype).get((call.layer, int(half)))
                    if entry is not None:
                        ks.append(entry[0])
                        vs.append(entry[1])
                per_row_k.append(ks)
                per_row_v.append(vs)
        lengths = [sum(t.shape[0] for t in ks) for ks in per_row_k]
        out = torch.empty_like(q)
        # One attention call per distinct extra length (usually one), never one per image.
        for length in sorted(set(lengths)):
            sel = [r for r in range(rows) if lengths[r] == length]
            if length:
                bk = torch.stack([torch.cat(per_row_k[r]) for r in sel])
                bv = torch.stack([torch.cat(per_row_v[r]) for r in sel])
            else:
                bk = bv = q.new_zeros(len(sel), 0, c)
            if csa_k is not None:
                bk, bv = torch.cat((bk, csa_k[sel]), 1), torch.cat((bv, csa_v[sel]), 1)
            fn = lambda qq, kk, vv, h, **_: self._attention(qq, kk, vv, h, extra_options)  # noqa: E731
            if len(sel) == rows:
                return attend_with_extra(q, k, v, bk, bv, heads, fn)
            out[sel] = attend_with_extra(q[sel], k[sel], v[sel], bk, bv, heads, fn)
        return out


def _csa_layers(model_patcher) -> dict:
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    return {key: p for key, p in replaces.items() if isinstance(p, _CSALayer)}


def csa_settings_of(model_patcher) -> CSASettings | None:
    """The CSASettings of a model patched by :func:`apply_csa`, else None."""
    layers = _csa_layers(model_patcher)
    return next(iter(layers.values())).settings if layers else None


def apply_csa(model_patcher, settings: CSASettings):
    """Return a clone of ``model_patcher`` with CSA on the self-attention of ``settings.blocks``.

    One memo is shared by all layers (plans are per resolution and step, not per layer). Existing attn1
    replace patches on the same keys are kept and called with the extended keys. Raises
    UnsupportedModelError for models without UNet transformer blocks.
    """
    blocks = attention_blocks(model_patcher)
    m = model_patcher.clone()
    memo = _Memo()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for (name, number, depth), factor in blocks.items():
        if name not in settings.blocks:
            continue
        previous = existing.get((name, number, depth), existing.get((name, number)))
        if isinstance(previous, _CSALayer):  # CSA applied twice: the new settings replace the old ones
            previous = previous.previous
        m.set_model_attn1_replace(_CSALayer(settings, previous, memo, factor), name, number, depth)
    return m


def apply_recording(model_patcher, recorder: BankRecorder):
    """Clone a CSA-patched model so its CSA layers also record into ``recorder`` (write phase)."""
    layers = _csa_layers(model_patcher)
    m = model_patcher.clone()
    for (name, number, depth), layer in layers.items():
        m.set_model_attn1_replace(layer.derive(recorder=recorder), name, number, depth)
    return m


def apply_reading(model_patcher, reader: BankReader, node: str = "SDN_ReadCharacterBanks"):
    """Clone a model so the layers recorded in the banks read them (read phase).

    CSA layers already on the model keep their settings (used when ``reader.share``); other recorded layers
    get a reader with default settings and CSA off. Raises UnsupportedModelError (see :func:`attention_blocks`)
    and BankMismatchError when a bank holds a layer the model does not have.
    """
    blocks = attention_blocks(model_patcher, node)
    layers = _csa_layers(model_patcher)
    m = model_patcher.clone()
    memo = _Memo()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    recorded = set().union(*(bank.layers for bank in reader.banks))
    for name_key in sorted(recorded):
        name, number, depth = name_key.split(".")
        key = (name, int(number), int(depth))
        layer = layers.get(key)
        if layer is not None:
            new = layer.derive(reader=reader, recorder=None)
        elif key in blocks:
            previous = existing.get(key, existing.get(key[:2]))
            new = _CSALayer(CSASettings(), previous, memo, blocks[key], reader=reader, enabled=False)
        else:
            raise BankMismatchError(f"{node}: a character bank holds layer {name_key}, which this model does not "
                                    f"have: it was recorded with another architecture")
        m.set_model_attn1_replace(new, *key)
    return m


__all__ = ["CSASettings", "BankReader", "BankRecorder", "apply_csa", "apply_recording", "apply_reading",
           "attention_blocks", "csa_settings_of", "is_video_unet", "BLOCK_CHOICES", "SCHEDULE_CHOICES"]
