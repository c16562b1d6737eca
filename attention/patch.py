"""Consistent Self-Attention inside ComfyUI: attn1 replace patches and model wrappers on a ModelPatcher clone.

Works on every UNet whose transformer blocks are ComfyUI's ``BasicTransformerBlock`` (SD1.x, SD2.x, SDXL and
their fine-tunes/LoRAs). The attn1 replaces receive projected q/k/v, so shared tokens are never re-projected.

One context per model call: the patched model carries a :class:`StoryAttention` as its APPLY_MODEL wrapper
(``comfy.patcher_extension``). Once per model call it works out what the call is (context.py: rows, step, CFG
chunks, frames, the sampling plan of every resolution level, the schedule's gates, the step's bank entries on
the device) and hands it to the layers in the call's transformer_options; the layers (roles.py) only look it
up, so they never read anything back from the device (one host read of the sigma per model call, one of the
schedule per run). Its OUTER_SAMPLE wrapper holds the run's caches and a recording, released when sampling
ends.

- rows: ``original_shape[0]`` rows = ``len(cond_or_uncond)`` chunks x B images, ``row = chunk * B + image``.
  One call may hold both CFG halves, one half (memory split), one chunk (cfg = 1) or several positive chunks:
  each chunk's B images form the group, and all chunks share one sampling plan. Layer calls whose rows are not
  the call's (an unknown layout) get plain attention; video UNets (SVD) are refused up front.
- step: the position of the current sigma in the run's schedule (nearest entry), never a call counter, so
  multi-evaluation samplers, split calls and re-runs see the same step.
- resolution: the layer's downsampling factor, from the block's place in the UNet (:func:`attention_blocks`),
  so odd latent sizes cannot put a layer in the wrong bucket.
- context windows: :func:`.frames.window_frames` gives the absolute image indices of the rows (core context
  windows with or without their causal anchor frame, AnimateDiff-Evolved ``ad_params``), so reference images
  are recognised inside a window.

No state outside the patch objects and the run: a result never depends on what ran before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import StoryDiffusionError, UnsupportedModelError
from .bank import BankMismatchError, BankRecorder, layer_name
from .context import CONTEXT, NODE, READ_NODE, RUN, Run, level_tokens
from .dit import DIT_BLOCK_CHOICES, Family, JointAttention, dit_family, dit_layers, joint_width, set_override
from .regions import level_hw
from .roles import RecordPatch, SelfAttention

WRAPPER = "storydiffusion_native"  # key of the pack's model wrappers
BLOCK_CHOICES = {
    "decoder": ("output",),
    "decoder + middle": ("middle", "output"),
    "encoder + decoder": ("input", "output"),
    "all": ("input", "middle", "output"),
}
SCHEDULE_CHOICES = ("always", "storydiffusion")


@dataclass(frozen=True)
class CSASettings:
    """What the SDN_ConsistentSelfAttention node configures.

    rates: sampling rate by image-level downsampling factor of the layer (8, 16, 32; coarser layers use the
    1/32 rate; DiT image tokens sit at 1/16). reference_count: R (0 = all-to-all). seed: sampling seed. blocks:
    ComfyUI block names to patch in a UNet; dit_blocks: DiT stages to patch ("double": the early blocks, "single":
    the later ones; which blocks they are per family: dit.dit_family).
    sigma_start / sigma_end: CSA is active while ``sigma_end <= sigma <= sigma_start``.
    schedule: "always", or "storydiffusion" (the reference app: plain attention at step 0, then each layer call
    skips CSA with probability 0.3 for steps 1..19 and 0.1 from step 20, deterministic per seed).
    tile_size: 0 = off; T > 1 = each image shares only with the T - 1 images around it (sliding window).
    subject_masks: share only the characters' regions (regions.py; needs SDN_CharacterMasks' model).
    """

    rates: tuple[tuple[int, float], ...] = ((8, 0.5), (16, 0.5), (32, 0.5))
    reference_count: int = 0
    seed: int = 0
    blocks: tuple[str, ...] = ("output",)
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    schedule: str = "always"
    tile_size: int = 0
    dit_blocks: tuple[str, ...] = DIT_BLOCK_CHOICES["single-stream"]
    subject_masks: bool = False

    def rate_for(self, factor: int) -> float:
        rates = dict(self.rates)
        if factor in rates:
            return rates[factor]
        coarsest = max(rates)
        return rates[coarsest] if factor > coarsest else 0.0

    def as_dict(self) -> dict:
        return {"rates": [list(r) for r in self.rates], "reference_count": self.reference_count, "seed": self.seed,
                "blocks": list(self.blocks), "sigma_start": self.sigma_start if math.isfinite(self.sigma_start)
                else "inf", "sigma_end": self.sigma_end, "schedule": self.schedule, "tile_size": self.tile_size,
                "subject_masks": self.subject_masks}


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
    return {key: factor for key, (factor, _) in _self_attention(model_patcher, node).items()}


def _self_attention(model_patcher, node: str = NODE) -> dict:
    """:func:`attention_blocks` with each block's attention module: ``{key: (factor, attn1)}``."""
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
                            found[(name, number, depth)] = (8 << level, tb.attn1)
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
class BankReader:
    """Read-phase configuration shared by all layers of one patched model.

    banks: the character banks. routing: per absolute image index of the read batch, the indices of the banks
    that image reads (None: every image reads every bank). share: images of a read batch also share among
    themselves with CSA (the model's CSA settings). subject_masks: route by character regions (needs
    SDN_CharacterMasks' model and banks recorded with subject masks): slot k of a panel (its k-th character, by
    name) sees the tokens of that character's bank whose region bit is set and, sharing, the batch's CSA tokens
    inside that character's regions; a query in no region of a multi-character panel sees its own image only.
    """

    banks: tuple
    routing: tuple | None = None
    share: bool = False
    subject_masks: bool = False

    def __deepcopy__(self, memo):
        return self

    def banks_for(self, image: int) -> tuple:
        """Indices of the banks absolute image ``image`` reads; BankMismatchError beyond the story's panels."""
        if self.routing is None:
            return tuple(range(len(self.banks)))
        if image >= len(self.routing):
            raise BankMismatchError(
                f"the story routes character banks for {len(self.routing)} panels, but the latent batch has "
                f"more images (image {image + 1}). Use the story's panel_count as the batch size.")
        return self.routing[image]


@dataclass(frozen=True, eq=False)
class StoryAttention:
    """What one patched model does in its self-attention layers, registered as its APPLY_MODEL wrapper (one
    context per model call) and OUTER_SAMPLE wrapper (one :class:`~.context.Run` per sampling run).

    ``settings``: CSA settings (None: a model that only reads banks); ``layers``: ``{name: SelfAttention}`` (or
    ``{name: dit.JointLayer}``), the layers it patched; ``recorder`` (write phase) or ``reader`` (read phase);
    ``family``: the DiT family (None: a UNet).
    """

    settings: CSASettings | None
    layers: dict
    recorder: BankRecorder | None = None
    reader: BankReader | None = None
    family: Family | None = None

    def __deepcopy__(self, memo):
        return self

    @property
    def masked(self) -> bool:
        """Subject masks route this model's sharing, recording and reading (CSA's or the reader's subject_masks)."""
        return bool(self.settings is not None and self.settings.subject_masks
                    or self.reader is not None and self.reader.subject_masks)

    def tokens(self, latent_hw: tuple, factor: int) -> int:
        """Image tokens of the model's layers at ``factor`` for a latent of ``latent_hw``."""
        return level_tokens(latent_hw, factor) if self.family is None else self.family.image_tokens(latent_hw)

    def level_hw(self, latent_hw: tuple, factor: int) -> tuple[int, int]:
        """Height and width (row-major token grid) of the model's layers at ``factor`` for a latent of ``latent_hw``
        (a DiT: its image tokens, :meth:`dit.Family.grid`)."""
        return level_hw(latent_hw, factor) if self.family is None else self.family.grid(latent_hw)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        """APPLY_MODEL wrapper: describe the call, hand the description to the layers."""
        options = transformer_options or {}
        run = options.get(RUN)
        if run is None or run.spec is not self:  # ComfyUI merges model wrappers only where a sampler runs
            raise StoryDiffusionError(f"{NODE}: the patched model was called outside a run of ComfyUI's sampler "
                                      f"(its OUTER_SAMPLE wrapper did not run)")
        text, joint = (0, None) if self.family is None or c_crossattn is None else \
            self.family.layout(c_crossattn.shape[1], tuple(x.shape[-2:]), kwargs)
        call = run.describe(x, float(t.max()), options, text, joint)  # the call's one host read
        return executor(x, t, c_concat, c_crossattn, control, {**options, CONTEXT: call}, **kwargs)

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        """OUTER_SAMPLE wrapper: one Run for the whole sampling, visible to every model call, released after."""
        guider = executor.class_obj
        options = guider.model_options  # the guider's copy for this sampling
        cfg = getattr(guider, "cfg", None)  # ComfyUI skips the negative half at cfg 1 (its cfg1 optimisation)
        halves = 2 if (getattr(guider, "conds", None) or {}).get("negative") and not (
            cfg is not None and math.isclose(cfg, 1.0) and not options.get("disable_cfg1_optimization", False)) else 1
        run = Run(self, sigmas.tolist(), noise.shape[0], noise.shape[-2:], guider.model_patcher.load_device, halves)
        options["transformer_options"] = {**options.get("transformer_options", {}), RUN: run}
        try:
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
            run.finish()
            return out
        finally:
            run.close()


def _story_attention(model_patcher) -> StoryAttention | None:
    import comfy.patcher_extension as ext

    found = model_patcher.get_wrappers(ext.WrappersMP.APPLY_MODEL, WRAPPER)
    return found[0] if found else None


def _install(model_patcher, spec: StoryAttention) -> None:
    import comfy.patcher_extension as ext

    for kind, wrapper in ((ext.WrappersMP.APPLY_MODEL, spec), (ext.WrappersMP.OUTER_SAMPLE, spec.outer_sample)):
        model_patcher.remove_wrappers_with_key(kind, WRAPPER)
        model_patcher.add_wrapper_with_key(kind, WRAPPER, wrapper)


def _attn1_replaces(model_patcher) -> dict:
    return model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})


def csa_settings_of(model_patcher) -> CSASettings | None:
    """The CSASettings of a model patched by :func:`apply_csa` (or derived from one), else None."""
    spec = _story_attention(model_patcher)
    return None if spec is None else spec.settings


def apply_csa(model_patcher, settings: CSASettings):
    """Return a clone of ``model_patcher`` with CSA on the self-attention of ``settings.blocks`` (a UNet) or on the
    joint attention of ``settings.dit_blocks`` (a DiT, dit.py).

    Existing attn1 replace patches (UNet) or attention override (DiT) are kept and called with the extended
    keys. Raises UnsupportedModelError for models that are neither a UNet with transformer blocks nor a
    supported DiT.
    """
    family = dit_family(model_patcher)
    if family is not None:
        return _apply_dit_csa(model_patcher, family, settings)
    blocks = _self_attention(model_patcher)
    m = model_patcher.clone()
    existing = _attn1_replaces(m)
    layers = {}
    for key, (factor, attn1) in blocks.items():
        if key[0] not in settings.blocks:
            continue
        previous = existing.get(key, existing.get(key[:2]))
        if isinstance(previous, SelfAttention):  # CSA applied twice: the new settings replace the old ones
            previous = previous.previous
        if previous is not None and settings.subject_masks:
            raise UnsupportedModelError(f"{NODE}: input 'subject_masks': layer {layer_name(key[:2], key[2])} already "
                                        f"has another attn1 replace patch, which cannot take the subject masks' key mask")
        layer = layers[key] = SelfAttention(key, factor, attn1, previous)
        m.set_model_attn1_replace(layer, *key)
    _install(m, StoryAttention(settings, {layer.name: layer for layer in layers.values()}))
    return m


def _apply_dit_csa(model_patcher, family: Family, settings: CSASettings):
    m = model_patcher.clone()
    layers = dit_layers(family, settings.dit_blocks)

    def build(previous):
        if isinstance(previous, JointAttention):  # CSA applied twice: the new settings replace the old ones
            previous = previous.previous
        return JointAttention(layers, previous, family.calls)
    set_override(m.model_options.setdefault("transformer_options", {}), build)
    _install(m, StoryAttention(settings, {layer.name: layer for layer in layers.values()}, family=family))
    return m


def _check_kind(reader: BankReader, family: Family | None, node: str) -> None:
    """BankMismatchError naming ``node`` for a bank recorded on the other kind of model (DiT vs UNet)."""
    kind = "unet" if family is None else "dit"
    for bank in reader.banks:
        if bank.kind != kind:
            recorded = "a DiT" if bank.kind == "dit" else "a UNet (SD1.x/SD2.x/SDXL)"
            model = "a UNet" if family is None else f"a DiT ({family.name})"
            raise BankMismatchError(f"{node}: character bank '{bank.name}' was recorded on {recorded}; this model is "
                                    f"{model}. Record the character with the model that reads it")


def apply_recording(model_patcher, recorder: BankRecorder):
    """Clone a CSA-patched model so it also records into ``recorder`` (write phase) while it is sampled."""
    spec = _story_attention(model_patcher)
    if spec is None or spec.settings is None:
        raise StoryDiffusionError("SDN_RecordCharacterBank: input 'model': expected a model patched by "
                                  "SDN_ConsistentSelfAttention")
    m = model_patcher.clone()
    if spec.family is not None:  # a DiT records keys and values in its attention override: size its entries
        width = joint_width(m)
        layers = {name: layer.derived(channels=width) for name, layer in spec.layers.items()}
        _install(m, replace(spec, layers=layers, recorder=recorder, reader=None))
        return m
    patches = m.model_options.get("transformer_options", {}).get("patches", {}).get("attn1_patch", [])
    if not any(isinstance(p, RecordPatch) for p in patches):
        m.set_model_attn1_patch(RecordPatch())
    _install(m, replace(spec, recorder=recorder, reader=None))
    return m


def apply_reading(model_patcher, reader: BankReader, node: str = READ_NODE):
    """Clone a model so the layers (UNet) or blocks (DiT) recorded in the banks read them (read phase).

    CSA layers already on the model keep their settings (the read batch shares with them when
    ``reader.share``); other recorded layers only read. Subject masks are on when ``reader.subject_masks`` or the
    model's CSA ``subject_masks`` is. Raises UnsupportedModelError (see :func:`attention_blocks`; subject masks over
    another attn1 replace of a UNet) and BankMismatchError when a bank holds a layer the model does not have,
    was recorded on the other kind of model (a DiT bank on a UNet or the reverse), or was recorded without subject
    masks while they are on.
    """
    family = dit_family(model_patcher, node)
    _check_kind(reader, family, node)
    spec = _story_attention(model_patcher)
    settings = spec.settings if spec is not None else None
    masked = reader.subject_masks or settings is not None and settings.subject_masks
    if masked:
        _check_masked(reader, node)
    if family is not None:
        return _apply_dit_reading(model_patcher, family, reader, node)
    blocks = _self_attention(model_patcher, node)
    m = model_patcher.clone()
    existing = _attn1_replaces(m)
    layers = dict(spec.layers) if spec is not None else {}
    for name in sorted(set().union(*(bank.layers for bank in reader.banks))):
        block, number, depth = name.split(".")
        key = (block, int(number), int(depth))
        if key not in blocks:
            raise BankMismatchError(f"{node}: a character bank holds layer {name}, which this model does not "
                                    f"have: it was recorded with another architecture")
        layer = layers.get(name)
        if layer is None:
            previous = existing.get(key, existing.get(key[:2]))
            layer = SelfAttention(key, blocks[key][0], blocks[key][1], previous, shares=False)
        layers[name] = layer.reading(reader)
        m.set_model_attn1_replace(layers[name], *key)
    if masked and any(layer.previous is not None for layer in layers.values()):
        raise UnsupportedModelError(f"{node}: input 'subject_masks': a layer of this model already has another attn1 "
                                    f"replace patch, which cannot take the subject masks' key mask")
    _install(m, StoryAttention(settings, layers, reader=reader))
    return m


def _check_masked(reader: BankReader, node: str) -> None:
    """Subject-masked reading: banks recorded with subject masks (their tokens' region bits)."""
    for bank in reader.banks:
        if not bank.masked:
            raise BankMismatchError(
                f"{node}: input 'subject_masks': character bank '{bank.name}' was recorded without subject masks "
                f"(its tokens carry no character regions). Re-record it with SDN_ConsistentSelfAttention's "
                f"subject_masks on and SDN_CharacterMasks' model (its reference panels naming only that character), "
                f"or read it with subject_masks off (on the read node and on the model's Consistent Self-Attention)")


def _apply_dit_reading(model_patcher, family: Family, reader: BankReader, node: str):
    """apply_reading on a DiT: the blocks the banks hold read them in the attention override (dit.read); CSA blocks
    already on the model keep their settings."""
    spec = _story_attention(model_patcher)
    m = model_patcher.clone()
    blocks = dit_layers(family, tuple(family.stages))
    layers = {}

    def build(previous):
        if isinstance(previous, JointAttention):
            layers.update(previous.layers)
            previous = previous.previous
        for name in sorted(set().union(*(bank.layers for bank in reader.banks))):
            block_type, index = name.split(".")
            key = (block_type, int(index))
            if key not in blocks:
                raise BankMismatchError(f"{node}: a character bank holds block {name}, which this model does not "
                                        f"have: it was recorded with another architecture")
            layers[key] = layers.get(key, blocks[key].derived(shares=False)).derived(reader=reader)
        return JointAttention(layers, previous, family.calls)
    set_override(m.model_options.setdefault("transformer_options", {}), build)
    _install(m, StoryAttention(spec.settings if spec is not None else None,
                               {layer.name: layer for layer in layers.values()}, reader=reader, family=family))
    return m


__all__ = ["CSASettings", "BankReader", "BankRecorder", "StoryAttention", "apply_csa", "apply_recording",
           "apply_reading", "attention_blocks", "csa_settings_of", "is_video_unet", "BLOCK_CHOICES",
           "SCHEDULE_CHOICES"]
