"""What one model call is, worked out once per call and handed to every self-attention layer.

The pack's APPLY_MODEL wrapper (patch.py) builds a :class:`Call` from the call's latent rows, sigma and
``transformer_options`` and puts it into the call's transformer_options under :data:`CONTEXT`; the layers only
look it up (roles.py), so no layer reads anything back from the device. Per-run data (the schedule, caches of
sampling plans, token draws and bank steps on the compute device, a recording in progress) lives on a
:class:`Run`, made by the OUTER_SAMPLE wrapper when sampling starts and dropped when it ends.

Randomness: every draw comes from a private CPU generator seeded by :func:`_mix` of integers (the CSA seed, the
step, the token count, a group size), never from the global RNG or a call counter, so split calls, re-runs and
multi-evaluation samplers see the same draws and results do not depend on the device.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import StoryDiffusionError
from .bank import BankMismatchError, entry_bytes, schedule_key
from .csa import SamplingPlan, make_plan, reference_tokens, tokens_per_source
from .frames import window_frames
from .regions import MASK_RUN, routing

CONTEXT = "storydiffusion_native"  # transformer_options key: the model call's Call
RUN = "storydiffusion_native_run"  # transformer_options key: the sampling run's Run
NODE = "SDN_ConsistentSelfAttention"
_BLOCK_IDS = {"input": 1, "middle": 2, "output": 3, "double": 4, "single": 5}
_REFERENCE_DRAW = 0xBA4C  # separates the reference-token draw from the plan draws of the same step


def _mix(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (not hash(): str hashes change per process)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


def level_tokens(latent_hw: tuple, factor: int) -> int:
    """Tokens of a layer at image-level downsampling ``factor`` (8 = the latent itself) for a latent of
    ``latent_hw``: every UNet downsampling (3x3 conv, stride 2, padding 1) rounds odd sizes up."""
    h, w = latent_hw
    for _ in range(factor.bit_length() - 4):
        h, w = -(-h // 2), -(-w // 2)
    return h * w


def plan_for(seed: int, step_key: int, tokens: int, images: int, rate: float, refs: int = 0,
             tile_size: int = 0) -> SamplingPlan:
    """The CPU sampling plan of a group of ``images`` at one step and level.

    All-to-all (refs 0, or refs >= images): drawn from (seed, step, tokens, images). 0 < refs < images: the
    references share among themselves exactly as a group of ``refs`` images alone (the same generator), and
    every later image sees :func:`reference_draw`'s tokens, the tokens a character bank recorded from those
    references at this step holds.
    """
    refs = refs if 0 < refs < images else 0
    group = refs or images
    return make_plan(images, tokens, rate, refs, _generator(seed, step_key, tokens, group),
                     tile_size=0 if refs else tile_size,
                     reference_generator=_generator(seed, step_key, tokens, group, _REFERENCE_DRAW))


def reference_draw(seed: int, step_key: int, tokens: int, refs: int, rate: float) -> torch.Tensor:
    """Flat indices ``(refs * M,)`` into the references' ``refs * tokens`` tokens: what a character bank records
    at this step and level, and what every later image of a batch with these references in front sees."""
    return reference_tokens(refs, tokens, tokens_per_source(tokens, rate),
                            _generator(seed, step_key, tokens, refs, _REFERENCE_DRAW))


def gate_open(seed: int, step: int, key: tuple) -> bool:
    """The reference app's schedule: plain attention at step 0, then each layer call keeps CSA with probability
    0.7 (steps 1..19) or 0.9 (later), deterministic per seed, step and layer ``key`` (block, number, depth)."""
    if step == 0:
        return False
    rng = random.Random(_mix(seed, step, _BLOCK_IDS.get(key[0], 0), key[1], key[2]))
    return rng.random() >= (0.3 if step < 20 else 0.1)


@dataclass(frozen=True)
class Level:
    """CSA at one resolution level of one call: ``plan`` (on the compute device) for the call's ``tokens``;
    ``order``/``inverse``: row permutation putting a window's references first, and back (None: in order);
    ``routing``: subject masks (csa.Routing), None to share whole images."""

    tokens: int
    plan: SamplingPlan
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    routing: object = None


@dataclass(frozen=True)
class Recording:
    """Write phase in one call: ``picks[tokens]``, flat indices ``(R * M,)`` into one chunk's ``R * tokens``
    rows of hidden states; ``targets[layer]``: ``((chunk, (step, layer, half), Tokens), ...)``."""

    picks: dict
    targets: dict
    run: object  # bank.RecordingRun


@dataclass(frozen=True)
class ReadGroup:
    """Rows of one call that read ``extra`` bank tokens in one layer: one attention call. ``rows`` (a slice or a
    device index) lists them part by part; ``parts``: ``((slice into the group, ((bank, half), ...)), ...)``, the
    rows reading the same bank tokens."""

    rows: slice | torch.Tensor
    count: int
    parts: tuple
    extra: int


@dataclass(frozen=True)
class Reading:
    """Read phase in one call: ``tokens[(bank, layer, half)]``, this step's bank entries on the compute device;
    ``groups[layer]``: the call's rows grouped by how many bank tokens they read there; ``share``: rows also
    share among themselves (CSA)."""

    tokens: dict
    groups: dict
    share: bool


@dataclass(frozen=True)
class Call:
    """One model call: ``rows`` = ``len(chunks)`` x ``images`` latent rows, ``row = chunk * images + image``;
    ``chunks``: cond_or_uncond; ``step`` (None without a schedule); ``frames``: the rows' absolute image indices
    under a context window, else None; ``latent_hw``; ``levels[factor]``: CSA where it is active; ``sharing``: the
    layers where CSA runs in this call (active range, rate > 0, the schedule's gates); ``record``/``read``;
    ``text``: the text tokens a DiT's joint sequence starts with; ``joint``: the whole joint sequence where the
    family fixes it (None: unchecked); ``blocks``: counts the calls of that length, the block index of a model
    that names none (None: the model names its blocks)."""

    rows: int
    images: int
    chunks: tuple
    step: int | None
    frames: tuple | None
    latent_hw: tuple
    levels: dict
    sharing: frozenset
    record: Recording | None = None
    read: Reading | None = None
    text: int = 0
    joint: int | None = None
    blocks: Iterator | None = None

    def level(self, layer) -> Level | None:
        """The CSA level of ``layer`` (a roles.SelfAttention) in this call, None where it does not share."""
        return self.levels.get(layer.factor) if layer.name in self.sharing else None


class Run:
    """One sampling run of a patched model (``spec``: a patch.StoryAttention).

    ``schedule``: the run's sigmas (read from the device once); ``batch``, ``latent_hw``: the latent's; ``device``:
    the compute device. Caches (plans, token draws, bank steps on the device, row indices) keep the current
    step only; everything goes when the run is closed.
    """

    def __init__(self, spec, schedule: list, batch: int, latent_hw: tuple, device, halves: int = 2):
        self.spec, self.schedule, self.batch, self.latent_hw = spec, list(schedule), batch, tuple(latent_hw)
        self.device = torch.device(device)
        self.key = schedule_key(self.schedule)
        self.cache_step, self.cache = None, {}
        self.recording = None
        if spec.recorder is not None:
            self._need_schedule("recording a character bank")
            spec.recorder.check_size(*self.recording_size(halves))  # BankSizeError before anything is stored
            self.recording = spec.recorder.start(self.key, self.latent_hw, batch, self.device)
        if spec.reader is not None:
            self._need_schedule("reading character banks")
            for bank in spec.reader.banks:
                bank.check_schedule(self.key, self.latent_hw)
            for image in range(batch):
                spec.reader.banks_for(image)

    def recording_size(self, halves: int) -> tuple[int, str]:
        """``(bytes, formula)``: what recording this run stores, computed from the schedule before sampling: for
        every step whose sigma is in the active range, every layer sharing at that step (:meth:`_sharing`: rate >
        0, the schedule's gates), each of the ``halves`` CFG halves sampled (1 at cfg 1): R references x M =
        round(rate x N) tokens x ``layer.kv`` (1: UNet hidden states, 2: DiT keys and values) rows of C channels
        in the storage dtype (fp8: + 4 B a row). Equal to the recorded bytes when every step calls the model."""
        dtype, total, terms = self.spec.recorder.storage_dtype, 0, {}
        for step, sigma in enumerate(self.schedule[:-1]):
            for name in self._sharing(step, sigma):
                layer = self.spec.layers[name]
                tokens = self.spec.tokens(self.latent_hw, layer.factor)
                m = tokens_per_source(tokens, self.spec.settings.rate_for(layer.factor))
                key = (tokens, m, layer.kv, layer.channels)
                terms[key] = terms.get(key, 0) + halves
                total += halves * entry_bytes(layer.kv * self.batch * m, layer.channels, dtype)
        scales = " + 4 B of fp8 scale a row" if dtype == torch.float8_e4m3fn else ""
        formula = " + ".join(
            f"{count} (step, layer, CFG half) x {self.batch} reference(s) x {m} of {tokens} tokens"
            f"{' x 2 (keys, values)' if kv == 2 else ''} x {c} channels" for (tokens, m, kv, c), count in terms.items())
        return total, f"{formula or 'nothing'} x {dtype.itemsize} B{scales}"

    def _sharing(self, step: int | None, sigma: float) -> frozenset:
        """The layers where CSA runs at ``step`` (sigma ``sigma``): active range, rate > 0, the schedule's gates."""
        s, spec = self.spec.settings, self.spec
        if s is None or not s.sigma_end <= sigma <= s.sigma_start:
            return frozenset()
        return frozenset(name for name, layer in spec.layers.items() if layer.shares and s.rate_for(layer.factor) > 0
                         and (s.schedule != "storydiffusion" or step is None or gate_open(s.seed, step, layer.key)))

    def _need_schedule(self, what: str):
        if len(self.schedule) < 2:
            raise BankMismatchError(f"{what} needs a sampler that sets sample_sigmas (every stock KSampler does)")

    def finish(self):
        if self.recording is not None:
            self.recording.finish()

    def close(self):
        self.cache, self.recording = {}, None

    def step_of(self, sigma: float) -> int | None:
        """Nearest step of the schedule (multi-evaluation samplers also call the model between steps)."""
        if len(self.schedule) < 2:
            return None
        return min(range(len(self.schedule) - 1), key=lambda i: abs(self.schedule[i] - sigma))

    def _cached(self, step_key, key, build):
        if step_key != self.cache_step:
            self.cache_step, self.cache = step_key, {}
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = build()
        return value

    def describe(self, x: torch.Tensor, sigma: float, options: dict, text: int = 0, joint: int | None = None) -> Call:
        """The Call of one model call: latent rows ``x`` ``(rows, C, H, W)`` (or ``(rows, C, T, H, W)``), its
        ``sigma`` (a float: read once per call by the wrapper), its transformer_options, its ``text`` tokens and
        ``joint`` sequence (DiTs; a ``joint`` length also starts the call's block counter).
        Raises FrameLayoutError for an unknown window layout and BankMismatchError for what banks cannot do
        (windows while recording, panels beyond the story)."""
        spec, s = self.spec, self.spec.settings
        chunks = tuple(int(c) for c in options.get("cond_or_uncond") or (0,))
        rows = x.shape[0]
        images = rows // len(chunks)
        step = self.step_of(sigma)
        step_key = step if step is not None else int(sigma * 1e6)  # no schedule: key by sigma
        frames = window_frames(options, images, NODE)
        frames = None if frames is None else tuple(frames)
        latent_hw = tuple(x.shape[-2:])
        sharing = self._cached(step_key, ("sharing", s is not None and s.sigma_end <= sigma <= s.sigma_start),
                               lambda: self._sharing(step, sigma))
        masks = self._masks(options, step_key, images, frames) if s is not None and s.subject_masks else None
        if masks is False:  # subject masks before the first masks exist: nothing is shared yet
            sharing = frozenset()
        levels = self._levels(step_key, images, frames, latent_hw, sharing, masks) if images > 1 else {}
        record = self._record(step, step_key, images, chunks, frames, latent_hw, sharing) \
            if self.recording is not None and sharing else None
        read = self._read(step, images, chunks, frames) if spec.reader is not None else None
        return Call(rows, images, chunks, step, frames, latent_hw, levels, sharing, record, read, text, joint,
                    None if joint is None else itertools.count())

    def _masks(self, options: dict, step_key, images: int, frames):
        """``(soft masks (images, characters, h, w), named columns per image, threshold)`` for subject-masked CSA, False while
        none exist yet (the run's first step). StoryDiffusionError without SDN_CharacterMasks' model, for context
        windows and for a batch that is not the masks' story."""
        mask_run = options.get(MASK_RUN)
        if mask_run is None:
            raise StoryDiffusionError(f"{NODE}: input 'subject_masks': needs the model from SDN_CharacterMasks "
                                      f"(apply Character Masks to the model before or after this node)")
        if frames is not None:
            raise StoryDiffusionError(f"{NODE}: subject masks do not support context windows: sample the panels in "
                                      f"one batch")
        soft = mask_run.before(step_key)
        if soft is None:
            return False
        if soft.shape[0] != images:
            raise StoryDiffusionError(f"{NODE}: the character masks are for {soft.shape[0]} panels but the model "
                                      f"call has {images} images: use the story's panel_count as the batch size")
        return soft, mask_run.named(), mask_run.recorder.threshold

    def _levels(self, step_key, images, frames, latent_hw, sharing, masks=None) -> dict:
        s, spec = self.spec.settings, self.spec
        refs = 0 if spec.reader is not None else s.reference_count  # reading batches share all-to-all
        order = None
        if frames is not None and refs > 0:
            ref_pos = [p for p, a in enumerate(frames) if a < refs]
            refs = len(ref_pos)
            if refs and ref_pos != list(range(refs)):
                order = tuple(ref_pos + [p for p in range(images) if p not in ref_pos])
        levels = {}
        for factor in {spec.layers[name].factor for name in sharing}:
            tokens, rate = spec.tokens(latent_hw, factor), s.rate_for(factor)

            def build():
                plan = plan_for(s.seed, step_key, tokens, images, rate, refs, s.tile_size).to(self.device)
                if masks is not None:
                    return Level(tokens, plan, routing=routing(masks[0], masks[1], spec.level_hw(latent_hw, factor),
                                                               masks[2]))
                if order is None:
                    return Level(tokens, plan)
                perm = torch.tensor(order)
                return Level(tokens, plan, *(p.to(self.device, non_blocking=True) for p in (perm, torch.argsort(perm))))
            levels[factor] = self._cached(step_key, ("level", tokens, images, rate, refs, order), build)
        return levels

    def _record(self, step, step_key, images, chunks, frames, latent_hw, sharing) -> Recording:
        if frames is not None:
            raise BankMismatchError("recording a character bank does not support context windows: sample the "
                                    "reference images in one batch")
        s, spec = self.spec.settings, self.spec
        layers, picks = [], {}
        for name in sorted(sharing):
            layer = spec.layers[name]
            tokens, rate = spec.tokens(latent_hw, layer.factor), s.rate_for(layer.factor)
            layers.append((name, layer.kv * images * tokens_per_source(tokens, rate), layer.channels))
            picks[tokens] = self._cached(step_key, ("picks", tokens, images, rate), lambda: reference_draw(
                s.seed, step_key, tokens, images, rate).to(self.device, non_blocking=True))
        targets, seen = {}, set()
        for g, half in enumerate(chunks):
            if half in seen:  # several positive entries: the first one's tokens represent the half
                continue
            seen.add(half)
            for name, dest in self.recording.targets(step, half, tuple(layers)).items():
                targets.setdefault(name, []).append((g, (step, name, half), dest))
        return Recording(picks, targets, self.recording)

    def _read(self, step, images, chunks, frames) -> Reading:
        reader, spec = self.spec.reader, self.spec
        sets = [reader.banks_for(a) for a in (frames or range(images))]
        tokens = {}
        for j in sorted(set().union(*sets)):
            for (layer, half), entry in self._cached(step, ("bank", j), lambda: {
                    key: t.to(self.device) for key, t in reader.banks[j].steps.get(step, {}).items()}).items():
                tokens[(j, layer, half)] = entry
        groups, memo = {}, {}
        for name, layer in spec.layers.items():
            if layer.reader is None:
                continue
            keys = tuple(tuple((j, half) for j in sets[i] if (j, name, half) in tokens)
                         for half in chunks for i in range(images))
            size = {k: tokens[(k[0], name, k[1])].hidden.shape[0] for row in keys for k in row}
            memo_key = (keys, tuple(sorted(size.items())))
            if memo_key not in memo:  # layers of one level read alike: group once
                memo[memo_key] = self._groups(step, keys, size)
            groups[name] = memo[memo_key]
        return Reading(tokens, groups, reader.share)

    def _groups(self, step, keys: tuple, size: dict) -> tuple:
        """Rows by number of bank tokens (one attention call each), each group's rows ordered part by part."""
        parts: dict = {}
        for row, row_keys in enumerate(keys):
            parts.setdefault(row_keys, []).append(row)
        by_extra: dict = {}
        for row_keys, rows in parts.items():
            by_extra.setdefault(sum(size[k] for k in row_keys), []).append((row_keys, rows))
        groups = []
        for extra, members in sorted(by_extra.items()):
            order, spans = [], []
            for row_keys, rows in members:
                spans.append((slice(len(order), len(order) + len(rows)), row_keys))
                order += rows
            groups.append(ReadGroup(self._rows(step, tuple(order)), len(order), tuple(spans), extra))
        return tuple(groups)

    def _rows(self, step, order: tuple):
        if order == tuple(range(order[0], order[0] + len(order))):
            return slice(order[0], order[0] + len(order))
        return self._cached(step, ("rows", order), lambda: torch.tensor(order).to(self.device, non_blocking=True))


__all__ = ["CONTEXT", "RUN", "Call", "Level", "Run", "plan_for", "reference_draw", "gate_open", "level_tokens"]
