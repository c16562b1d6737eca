"""Character masks from cross-attention (issue 10): where each panel's image attends to its characters' words.

The mask of character c in image i is the attention probability of the image's tokens to c's span tokens
(``Panel.spans``, positions on SDN_StoryPrompt's positive cond), computed from the attn2 query and keys like
the attention itself (Prompt-to-Prompt, Hertz et al., arXiv 2208.01626; ConsiStory's subject masks, Tewel et
al., arXiv 2402.03286):

    p[i, n, c] = mean over heads and over the attn2 layers at 1/16 of the image (SD1.x/SD2.x: input 4, 5 and
                 output 6, 7, 8; SDXL: input 4, 5 and output 3, 4, 5) of
                 sum over t in span(c) of softmax_t(q[i, n] . k[i, t] / sqrt(d))

with the softmax over ALL the call's text tokens, for the positive CFG half only (its first chunk). The 1/16
level is the most semantic one every SD UNet has attn2 at. Each (image, character) map is then smoothed (a 3x3
binomial blur, regions.smooth) and min-max normalised to [0, 1]; a character the panel does not name (``[NC]``
panels included) gets an all-zero map. No extra UNet pass: the patch computes the probabilities next to the
layer's own attention (whose output it leaves untouched) and keeps them as device tensors on the run.

Which step feeds what: the node's MASK output is the last step's maps (moved to the CPU once, when sampling
ends). Subject-masked CSA (SDN_ConsistentSelfAttention's ``subject_masks``) at step t uses the maps of the
latest earlier step (step t - 1 for one model call a step), since a UNet's self-attention layers run before
its 1/16 cross-attention: deterministic, no extra pass; at the first step no maps exist yet and nothing is
shared. Masks given to the node (a MASK input) replace the attention-derived ones at every step.

DiTs (Flux.1, Chroma, SD3/SD3.5: the families whose text encoder gives token spans, dit.Family.spans) have no
cross-attention: the text-to-image part of their joint attention plays its role (ConceptAttention, Helbling et
al., arXiv 2502.04320, reads Flux's maps there). For image i's image queries n:

    p[i, n, c] = mean over heads and over the recorded blocks of
                 sum over t in span(c) of softmax over ALL keys k of image i's joint sequence (q[i, n] . k / sqrt(d))

with the model's own attention mask (text padding), i.e. the probability the block gives c's words, as the
model computes it; the recorded blocks are the double-stream blocks (Flux.1, Chroma; dit_blocks "double-stream")
or the earlier half of the joint blocks (SD3/SD3.5, without MMDiT-X's image-only attn2): there the text keeps its
own stream, as a UNet's cross-attention keeps its own text, and the node's default CSA (single-stream: the later
blocks) leaves them plain. Where CSA also runs in a recorded block, the probabilities are still those over the
image's own joint sequence (the override that records sits above CSA's, :func:`dit.set_override`), so the extra
keys never dilute them. One extra attention pass per recorded block over the positive rows (torch SDPA with the
span columns as values: nothing the size of the attention matrix is kept). The masks lie on the image-token grid
(dit.Family.grid). The other DiT families take given masks only.

Per-call design as in context.py: an APPLY_MODEL wrapper (:class:`CharacterMasks`) decides once per model call
whether it records (the step, the positive rows) and hands the layers a :class:`MaskCall` with the spans as a
device tensor; an OUTER_SAMPLE wrapper makes the run's :class:`MaskRun` and publishes its masks into the
:class:`MaskRecorder` (the node output) when sampling ends.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import NodeInputError, StoryDiffusionError
from .csa import image_query_mask, joint_mask
from .dit import OVERRIDE, Family, called_block, dit_family
from .patch import attention_blocks
from .regions import MASK_RUN, level_hw, normalise, smooth

NODE = "SDN_CharacterMasks"
WRAPPER = MASK_RUN  # key of the wrappers; transformer_options key of the MaskRun
CALL = "sdn_character_masks_call"
FACTOR = 16  # image-level downsampling of the layers the masks come from


@dataclass(eq=False)
class MaskRecorder:
    """The ``SDN_MASK_RECORDER`` payload, filled by each finished sampling run of its model (the last run wins).

    ``names``: the story's characters (mask columns); ``spans[panel]``: ``{name: ((start, stop), ...)}`` from
    the story; ``named[panel]``: the columns of the characters the panel names; ``threshold``: a token is in a
    character's region where its mask exceeds it (subject-masked CSA); ``given``: float32 ``(panels, characters,
    h, w)`` in [0, 1] on the CPU, masks the user gave instead of attention-derived ones (None: derived);
    ``scale``: image pixels per latent pixel (8; Flux.2: 16). After a run: ``masks`` float32 ``(panels,
    characters, h, w)`` on the CPU on the recorded layers' token grid (a UNet's 1/16 level, ``h = ceil(ceil(H /
    2))``; a DiT's image tokens, ``h = ceil(H / patch)``; likewise w), values in [0, 1] (the given masks when
    given); ``latent_hw``: the run's latent size.
    """

    names: tuple
    spans: tuple
    named: tuple = ()
    threshold: float = 0.5
    given: torch.Tensor | None = None
    scale: int = 8
    masks: torch.Tensor | None = None
    latent_hw: tuple = ()

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies options: keep one recorder
        return self

    def labels(self) -> list[str]:
        """Row r of :meth:`stacked` is panel ``r // characters``, character ``names[r % characters]``."""
        return [f"{p * len(self.names) + c}: panel {p + 1}, {name}"
                for p in range(len(self.spans)) for c, name in enumerate(self.names)]

    def stacked(self, size: tuple) -> torch.Tensor:
        """MASK ``(panels x characters, *size)`` float32: the masks upsampled (bilinear) to ``size`` (height, width),
        row ``panel * characters + character``. StoryDiffusionError when nothing was recorded yet."""
        if self.masks is None:
            raise StoryDiffusionError(f"{NODE}: no masks were recorded: sample the panels with its model first")
        m = self.masks.flatten(0, 1)[:, None]
        return torch.nn.functional.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


@dataclass(frozen=True)
class MaskCall:
    """What the mask layers of one recording model call look up: ``rows``: the slice of the positive chunk's
    rows of the call's ``total`` rows; ``columns`` float32 ``(images, T, characters)`` on the compute device, 1
    where call token t is in the character's span of the image's panel; ``store[layer]``: the run's per-layer
    probabilities. A DiT's call also has ``image``: ``(start, stop)`` of the image tokens in the joint sequence
    (the text's T tokens come first), ``joint``: the whole sequence where the family fixes it (else None) and
    ``blocks``: the call's block counter (dit.called_block)."""

    rows: slice
    total: int
    columns: torch.Tensor
    store: dict
    image: tuple | None = None
    joint: int | None = None
    blocks: Iterator | None = None


@dataclass(eq=False)
class MaskRun:
    """One sampling run: ``length``: the positive cond's token count (the spans' axis); ``grid``: ``(h, w)`` of the
    recorded layers' N tokens; ``store[layer]``: ``(images, N, characters)`` probabilities of that layer at step
    ``store_step``; ``previous``: the processed maps (:meth:`_maps`) of the latest earlier step, on the compute
    device."""

    recorder: MaskRecorder
    schedule: list
    images: int
    length: int
    device: torch.device
    latent_hw: tuple
    grid: tuple
    store: dict = field(default_factory=dict)
    store_step: int | None = None
    previous: torch.Tensor | None = None
    columns: dict = field(default_factory=dict)
    given: torch.Tensor | None = None

    def step_of(self, sigma: float) -> int:
        return min(range(len(self.schedule) - 1), key=lambda i: abs(self.schedule[i] - sigma))

    def advance(self, step: int) -> None:
        """Start ``step``: the maps of the step before it become :attr:`previous` (device ops only)."""
        if step != self.store_step:
            if self.store:
                self.previous = self._maps()
            self.store, self.store_step = {}, step

    def before(self, step: int) -> torch.Tensor | None:
        """Soft masks ``(images, characters, h, w)`` on the compute device for CSA at ``step``: the given masks, or
        the maps of the latest step before ``step`` (None at the first step)."""
        if self.recorder.given is not None:
            if self.given is None:
                self.given = self.recorder.given.to(self.device, non_blocking=True)
            return self.given
        self.advance(step)
        return self.previous

    def named(self) -> tuple:
        return self.recorder.named

    def describe(self, options: dict, rows: int, tokens: int, sigma: float) -> MaskCall | None:
        """The call's :class:`MaskCall`, or None when it does not record (given masks, no positive chunk, rows that
        are not the whole batch per chunk). StoryDiffusionError for a context window or a call whose ``tokens``
        are not a multiple of the positive cond's."""
        self.advance(self.step_of(sigma))
        chunks = [int(c) for c in options.get("cond_or_uncond") or (0,)]
        if self.recorder.given is not None or 0 not in chunks or rows != len(chunks) * self.images:
            return None
        if options.get("context_window") is not None or isinstance(options.get("ad_params"), dict):
            raise StoryDiffusionError(f"{NODE}: character masks do not support context windows: sample the panels "
                                      f"in one batch")
        if tokens % self.length:
            raise StoryDiffusionError(f"{NODE}: a model call has {tokens} text tokens, not a multiple of the positive "
                                      f"conditioning's {self.length}: the story's token spans do not apply")
        g = chunks.index(0)
        columns = self.columns.get(tokens)
        if columns is None:  # ComfyUI repeats a cond to the batch's common length: every copy counts
            columns = self.columns[tokens] = _span_columns(self.recorder, self.images, tokens, self.length) \
                .to(self.device, non_blocking=True)
        return MaskCall(slice(g * self.images, (g + 1) * self.images), rows, columns, self.store)

    def _maps(self) -> torch.Tensor:
        """The store's layers averaged, as ``(images, characters, h, w)`` maps, smoothed and normalised."""
        h, w = self.grid
        p = torch.stack(list(self.store.values())).mean(0)  # (images, N, characters)
        return normalise(smooth(p.reshape(self.images, h, w, -1).permute(0, 3, 1, 2)))

    def finish(self) -> None:
        """Publish the last step's maps (or the given masks) to the recorder: one move to the CPU."""
        if self.recorder.given is not None:
            masks = self.recorder.given
        elif not self.store or self.store_step != len(self.schedule) - 2:
            raise StoryDiffusionError(f"{NODE}: no mask was recorded: the last step did not call the model with the "
                                      f"positive conditioning")
        else:
            masks = self._maps().cpu()
        self.recorder.masks = masks
        self.recorder.latent_hw = tuple(self.latent_hw)


def _span_columns(recorder: MaskRecorder, images: int, tokens: int, length: int) -> torch.Tensor:
    """``(images, tokens, characters)`` float32: 1 where token t (mod ``length``) is in the character's span of
    image i's panel, 0 elsewhere and for characters the panel does not name."""
    out = torch.zeros(images, length, len(recorder.names))
    for i in range(images):
        for c, name in enumerate(recorder.names):
            for start, stop in recorder.spans[i].get(name, ()):
                out[i, start:stop, c] = 1.0
    return out.repeat(1, tokens // length, 1)


def span_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor) -> torch.Tensor:
    """``(images, N, characters)`` float32: per image token, the attention probability (softmax over all T text
    tokens, scale 1/sqrt(d)) summed over each character's span and averaged over the ``heads``. ``q``
    ``(images, N, heads * d)``, ``k`` ``(images, T, heads * d)``, ``columns`` ``(images, T, characters)``."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (b, heads, N, T)
    return (probs @ columns[:, None]).mean(1)


class MaskAttn2:
    """attn2 replace patch of one 1/16-level block: the layer's attention (a previous attn2 replace, chained, or
    ComfyUI's own), unchanged, plus the span probabilities of the positive rows when the call records."""

    def __init__(self, name: tuple, base=None):
        self.name, self.base = name, base

    def __deepcopy__(self, memo):
        return self

    def to(self, device_or_dtype):
        return MaskAttn2(self.name, self.base.to(device_or_dtype) if hasattr(self.base, "to") else self.base)

    def models(self) -> list:
        return self.base.models() if hasattr(self.base, "models") else []

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        if self.base is not None:
            out = self.base(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                      transformer_options=extra_options)
        call = extra_options.get(CALL)
        if call is not None and q.shape[0] == extra_options["original_shape"][0]:
            call.store[self.name] = span_probabilities(q[call.rows], k[call.rows], heads, call.columns)
        return out


def joint_span_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, image: tuple,
                             columns: torch.Tensor) -> torch.Tensor:
    """``(images, N, characters)`` float32: per image token of a DiT's joint attention, the attention probability
    (softmax over ALL the keys of its own row, scale 1/sqrt(d), under the model's ``mask``) summed over each
    character's span tokens and averaged over the heads. ``q``, ``k`` ``[images, heads, L, d]`` (the joint
    sequence, after RoPE); ``image``: ``(start, stop)`` of the N image tokens in it; ``mask``: None or 4-D
    (csa.joint_mask) for these rows; ``columns`` ``(images, T, characters)`` for the text's first T tokens.

    The softmax-weighted sum of the span columns is attention with the columns as values: one SDPA call, which
    never holds the ``N x L`` probabilities at once (the columns padded to a multiple of 8, as the memory-efficient
    kernels want)."""
    s, e = image
    heads, length, chars = q.shape[1], k.shape[2], columns.shape[2]
    values = F.pad(columns, (0, -chars % 8, 0, length - columns.shape[1]))[:, None].expand(-1, heads, -1, -1)
    if mask is not None:
        mask = image_query_mask(mask, s, e, 0)
        mask = mask if mask.dtype == torch.bool else mask.float()
    probs = F.scaled_dot_product_attention(q[:, :, s:e].float(), k.float(), values, attn_mask=mask)
    return probs[..., :chars].mean(1)


@dataclass(frozen=True, eq=False)
class JointMasks:
    """ComfyUI's ``optimized_attention_override`` of a mask-recording DiT: in the ``blocks`` ((block_type, index);
    ``calls``: dit.Family.calls for a model that names none) of a recording model call it stores the positive
    rows' :func:`joint_span_probabilities`, then hands EVERY call on unchanged to ``previous`` (the override that
    was there: CSA's JointAttention, another pack's) or ComfyUI's own function. ``observes``: dit.set_override keeps
    it on top, so it sees the model's own q, k and mask whichever node was applied first."""

    blocks: frozenset
    calls: tuple = ()
    previous: object = None
    observes = True

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        call: MaskCall | None = (kwargs.get("transformer_options") or {}).get(CALL)
        if call is not None and call.image is not None:
            block = called_block(kwargs["transformer_options"], q, self.calls, call.joint, call.image[0], call.blocks)
            if block in self.blocks and q.shape[0] == call.total:
                if q.ndim == 3:  # SD3: [rows, L, heads * d]
                    qh, kh = (t[call.rows].reshape(call.columns.shape[0], t.shape[1], heads, -1).transpose(1, 2)
                              for t in (q, k))
                else:
                    qh, kh = q[call.rows], k[call.rows]
                mask = joint_mask(args[0] if args else kwargs.get("mask"))
                if mask is not None and mask.shape[0] != 1:
                    mask = mask[call.rows]
                call.store[block] = joint_span_probabilities(qh, kh, mask, call.image, call.columns)
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)


@dataclass(frozen=True, eq=False)
class CharacterMasks:
    """APPLY_MODEL (``__call__``) and OUTER_SAMPLE (:meth:`outer_sample`) wrappers of a mask-recording model
    (``family``: its DiT family, None for a UNet)."""

    recorder: MaskRecorder
    family: Family | None = None

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = transformer_options or {}
        run = options.get(WRAPPER)
        if run is None or run.recorder is not self.recorder:
            raise StoryDiffusionError(f"{NODE}: the model was called outside a run of ComfyUI's sampler (its "
                                      f"OUTER_SAMPLE wrapper did not run)")
        call = run.describe(options, x.shape[0], c_crossattn.shape[1], float(t.max()))  # the call's one host read
        if call is not None and self.family is not None:
            latent_hw = tuple(x.shape[-2:])
            start, joint = self.family.layout(c_crossattn.shape[1], latent_hw, kwargs)
            call = replace(call, image=(start, start + self.family.image_tokens(latent_hw)), joint=joint,
                           blocks=itertools.count())
        if call is not None:
            options = {**options, CALL: call}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        lengths = {c["cross_attn"].shape[1] for c in (guider.conds or {}).get("positive", [])
                   if c.get("cross_attn") is not None}
        if len(lengths) != 1:
            raise StoryDiffusionError(f"{NODE}: expected one positive conditioning (SDN_StoryPrompt's), got "
                                      f"{len(lengths)} token lengths {sorted(lengths)}")
        length = lengths.pop()
        panels, images = len(self.recorder.spans), noise.shape[0]
        if images != panels:
            raise StoryDiffusionError(f"{NODE}: the story has {panels} panels but the latent batch has {images} "
                                      f"images: use the story's panel_count as the batch size")
        stop = max((b for spans in self.recorder.spans for runs in spans.values() for _, b in runs), default=0)
        if stop > length:
            raise StoryDiffusionError(f"{NODE}: the story's token spans reach token {stop}, but the positive "
                                      f"conditioning has {length}: connect the conditioning of the same SDN_StoryPrompt")
        if len(sigmas) < 2:
            raise StoryDiffusionError(f"{NODE}: needs a sampler that sets sample_sigmas (every stock KSampler does)")
        options = guider.model_options
        latent_hw = tuple(noise.shape[-2:])
        run = MaskRun(self.recorder, sigmas.tolist(), images, length, guider.model_patcher.load_device, latent_hw,
                      level_hw(latent_hw, FACTOR) if self.family is None else self.family.grid(latent_hw))
        options["transformer_options"] = {**options.get("transformer_options", {}), WRAPPER: run}
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        run.finish()
        return out


def apply_masks(model_patcher, story, given: torch.Tensor | None = None, threshold: float = 0.5):
    """A clone of ``model_patcher`` that records character masks of ``story`` (a story.parser.Story with token
    spans) into a new :class:`MaskRecorder`; returns ``(model, recorder)``. A UNet: every 1/16-level attn2 block
    gets a :class:`MaskAttn2` chaining the attn2 replace already there; a DiT: a :class:`JointMasks` override on
    top of the one there (CSA's included). ``given``: float ``(panels, characters, h, w)`` masks in [0, 1] used
    instead of the attention-derived ones (then nothing is recorded); ``threshold``: region membership for
    subject-masked CSA. Raises UnsupportedModelError (naming SDN_CharacterMasks) for video UNets and unsupported
    transformers, NodeInputError without ``given`` on a DiT whose text encoder gives no token spans."""
    import comfy.patcher_extension as ext

    family = dit_family(model_patcher, NODE)
    names = tuple(story.characters)
    recorder = MaskRecorder(names, tuple(dict(p.spans) for p in story.panels),
                            tuple(tuple(names.index(n) for n in p.characters) for p in story.panels), float(threshold),
                            None if given is None else given.float().cpu().clamp(0, 1),
                            8 if family is None else FACTOR // family.patch)  # a DiT's tokens sit at 1/16
    m = model_patcher.clone()
    if family is not None:
        if given is None and not family.spans:
            raise NodeInputError(NODE, "masks", f"masks on {family.name}, whose text encoder gives no character token "
                                 f"spans (derived masks: Flux.1, Chroma, SD3/SD3.5)", got="none")
        blocks = frozenset((kind, i) for kind, indices in family.stages["double"] if kind != "x_block"
                           for i in indices)
        options = m.model_options.setdefault("transformer_options", {})
        previous = options.get(OVERRIDE)
        if isinstance(previous, JointMasks):  # masks applied twice: the new recorder replaces the old one
            previous = previous.previous
        options[OVERRIDE] = JointMasks(blocks, family.calls, previous)
    else:
        existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for key in [key for key, factor in attention_blocks(model_patcher, NODE).items() if factor == FACTOR]:
            base = existing.get(key, existing.get(key[:2]))
            if isinstance(base, MaskAttn2):  # masks applied twice: the new recorder replaces the old one
                base = base.base
            m.set_model_attn2_replace(MaskAttn2(key, base), *key)
    spec = CharacterMasks(recorder, family)
    for kind, wrapper in ((ext.WrappersMP.APPLY_MODEL, spec), (ext.WrappersMP.OUTER_SAMPLE, spec.outer_sample)):
        m.remove_wrappers_with_key(kind, WRAPPER)
        m.add_wrapper_with_key(kind, WRAPPER, wrapper)
    return m, recorder


__all__ = ["MaskRecorder", "MaskAttn2", "JointMasks", "CharacterMasks", "apply_masks", "span_probabilities",
           "joint_span_probabilities", "FACTOR"]
