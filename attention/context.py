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
from typing import NamedTuple

import torch

from ..errors import StoryDiffusionError
from .bank import BankMismatchError, entry_bytes, schedule_key
from .csa import Routing, SamplingPlan, make_plan, reference_tokens, region_visible, tokens_per_source
from .frames import window_frames
from .regions import MASK_RUN, level_hw, routing

CONTEXT = "storydiffusion_native"  # transformer_options key: the model call's Call
RUN = "storydiffusion_native_run"  # transformer_options key: the sampling run's Run
NODE = "SDN_ConsistentSelfAttention"
READ_NODE = "SDN_ReadCharacterBanks"
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
    ``latent_hw``: every UNet downsampling (3x3 conv, stride 2, padding 1) rounds odd sizes up
    (regions.level_hw)."""
    h, w = level_hw(latent_hw, factor)
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


class Masks(NamedTuple):
    """A call's character masks (masks.MaskRun): ``soft`` float ``(images, characters, h, w)`` on the compute
    device; ``named[image]``: the columns of the characters the image's panel names; ``threshold``; ``names``: the
    story's characters (columns)."""

    soft: torch.Tensor
    named: tuple
    threshold: float
    names: tuple


@dataclass(frozen=True)
class Recording:
    """Write phase in one call: ``picks[tokens]``, flat indices ``(R * M,)`` into one chunk's ``R * tokens``
    rows of hidden states; ``targets[layer]``: ``((chunk, (step, layer, half), Tokens), ...)``; ``bits[tokens]``
    (subject masks): bool ``(R * M,)``, whether each pick lies in the region of the references' character."""

    picks: dict
    targets: dict
    run: object  # bank.RecordingRun
    bits: dict | None = None


@dataclass(frozen=True)
class ReadGroup:
    """Rows of one call that read ``extra`` bank tokens in one layer: one attention call. ``rows`` (a slice or a
    device index) lists them part by part; ``parts``: ``((slice into the group, ((bank, half), ...)), ...)``, the
    rows reading the same bank tokens; ``slots`` (subject masks): per part, the bank each slot of its rows'
    panel reads (the panel's characters in order), else None."""

    rows: slice | torch.Tensor
    count: int
    parts: tuple
    extra: int
    slots: tuple | None = None


@dataclass(frozen=True)
class Reading:
    """Read phase in one call: ``tokens[(bank, layer, half)]``, this step's bank entries on the compute device;
    ``groups[layer]``: the call's rows grouped by how many bank tokens they read there; ``share``: rows also
    share among themselves (CSA); ``routes[layer]`` (subject masks, else None): per group, ``(visible, slot)``
    with ``visible`` bool ``(rows, K, E + S)`` (which of the group's E bank tokens and S CSA tokens each slot of a
    row sees, csa.slot_attention) and ``slot`` long ``(rows, N)`` (the slot each query reads)."""

    tokens: dict
    groups: dict
    share: bool
    routes: dict | None = None


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
            self.recording = spec.recorder.start(self.key, self.latent_hw, batch, self.device, spec.masked)
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
        in the storage dtype (fp8: + 4 B a row; subject masks: + 1 B of region bit a token). Equal to the recorded
        bytes when every step calls the model (with masks derived from attention, step 0 records nothing: less).
        """
        dtype, total, terms = self.spec.recorder.storage_dtype, 0, {}
        masked = self.spec.masked
        for step, sigma in enumerate(self.schedule[:-1]):
            for name in self._sharing(step, sigma):
                layer = self.spec.layers[name]
                tokens = self.spec.tokens(self.latent_hw, layer.factor)
                m = tokens_per_source(tokens, self.spec.settings.rate_for(layer.factor))
                key = (tokens, m, layer.kv, layer.channels)
                terms[key] = terms.get(key, 0) + halves
                total += halves * entry_bytes(layer.kv * self.batch * m, layer.channels, dtype,
                                              self.batch * m if masked else 0)
        scales = " + 4 B of fp8 scale a row" if dtype == torch.float8_e4m3fn else ""
        scales += " + 1 B of region bit a token" if masked else ""
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
        masks = self._masks(options, step_key, images, frames) if spec.masked else None
        if masks is False:  # subject masks before the first masks exist: nothing is shared or read yet
            sharing = frozenset()
        levels = self._levels(step_key, images, frames, latent_hw, sharing, masks) if images > 1 else {}
        record = self._record(step, step_key, images, chunks, frames, latent_hw, sharing, masks) \
            if self.recording is not None and sharing else None
        read = self._read(step, step_key, images, chunks, frames, latent_hw, levels, sharing, masks) \
            if spec.reader is not None and masks is not False else None
        return Call(rows, images, chunks, step, frames, latent_hw, levels, sharing, record, read, text, joint,
                    None if joint is None else itertools.count())

    def _masks(self, options: dict, step_key, images: int, frames) -> Masks | bool:
        """The call's :class:`Masks` for subject masks (CSA, writing or reading banks), False while none exist yet
        (the run's first step). StoryDiffusionError (naming the node whose subject_masks input is on) without
        SDN_CharacterMasks' model, for context windows and for a batch that is not the masks' story."""
        node = NODE if self.spec.settings is not None and self.spec.settings.subject_masks else READ_NODE
        mask_run = options.get(MASK_RUN)
        if mask_run is None:
            raise StoryDiffusionError(f"{node}: input 'subject_masks': needs the model from SDN_CharacterMasks "
                                      f"(apply Character Masks to the model before or after this node)")
        if frames is not None:
            raise StoryDiffusionError(f"{node}: subject masks do not support context windows: sample the panels in "
                                      f"one batch")
        soft = mask_run.before(step_key)
        if soft is None:
            return False
        if soft.shape[0] != images:
            raise StoryDiffusionError(f"{node}: the character masks are for {soft.shape[0]} panels but the model "
                                      f"call has {images} images: use the story's panel_count as the batch size")
        return Masks(soft, mask_run.named(), mask_run.recorder.threshold, mask_run.recorder.names)

    def _routing(self, step_key, latent_hw: tuple, factor: int, masks: Masks) -> Routing:
        """The call's routing (regions.routing) at the level of ``factor``, built once per step and level."""
        hw = self.spec.level_hw(latent_hw, factor)
        return self._cached(step_key, ("routing", hw), lambda: routing(masks.soft, masks.named, hw, masks.threshold))

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
                    return Level(tokens, plan, routing=self._routing(step_key, latent_hw, factor, masks))
                if order is None:
                    return Level(tokens, plan)
                perm = torch.tensor(order)
                return Level(tokens, plan, *(p.to(self.device, non_blocking=True) for p in (perm, torch.argsort(perm))))
            levels[factor] = self._cached(step_key, ("level", tokens, images, rate, refs, order), build)
        return levels

    def _record(self, step, step_key, images, chunks, frames, latent_hw, sharing, masks=None) -> Recording:
        if frames is not None:
            raise BankMismatchError("recording a character bank does not support context windows: sample the "
                                    "reference images in one batch")
        s, spec = self.spec.settings, self.spec
        layers, picks, bits = [], {}, None
        if masks is not None:
            subject = self._subject(masks)
            self.recording.subject, bits = masks.names[subject], {}
        for name in sorted(sharing):
            layer = spec.layers[name]
            tokens, rate = spec.tokens(latent_hw, layer.factor), s.rate_for(layer.factor)
            picked = images * tokens_per_source(tokens, rate)
            layers.append((name, layer.kv * picked, layer.channels, picked))
            picks[tokens] = self._cached(step_key, ("picks", tokens, images, rate), lambda: reference_draw(
                s.seed, step_key, tokens, images, rate).to(self.device, non_blocking=True))
            if bits is not None and tokens not in bits:  # the picks in the references' character region, as CSA routes
                bits[tokens] = self._routing(step_key, latent_hw, layer.factor, masks).member[picks[tokens], subject]
        targets, seen = {}, set()
        for g, half in enumerate(chunks):
            if half in seen:  # several positive entries: the first one's tokens represent the half
                continue
            seen.add(half)
            for name, dest in self.recording.targets(step, half, tuple(layers)).items():
                targets.setdefault(name, []).append((g, (step, name, half), dest))
        return Recording(picks, targets, self.recording, bits)

    @staticmethod
    def _subject(masks: Masks) -> int:
        """The column of the one character every reference panel names (a bank is one character's); else
        StoryDiffusionError."""
        columns = {cols[0] for cols in masks.named if len(cols) == 1}
        if len(columns) != 1 or any(len(cols) != 1 for cols in masks.named):
            named = [[masks.names[c] for c in cols] for cols in masks.named]
            raise StoryDiffusionError(f"SDN_RecordCharacterBank: with subject masks every reference panel must name "
                                      f"the bank's one character; the reference panels name {named}")
        return columns.pop()

    def _read(self, step, step_key, images, chunks, frames, latent_hw, levels, sharing, masks=None) -> Reading:
        reader, spec = self.spec.reader, self.spec
        slots = None if masks is None else self._cached(step_key, ("slot banks",), lambda: self._slot_banks(masks))
        sets = slots or [reader.banks_for(a) for a in (frames or range(images))]
        tokens = {}
        for j in sorted(set().union(*sets)):
            for (layer, half), entry in self._cached(step, ("bank", j), lambda: {
                    key: t.to(self.device) for key, t in reader.banks[j].steps.get(step, {}).items()}).items():
                tokens[(j, layer, half)] = entry
        groups, routes, memo = {}, {}, {}
        tags = None if slots is None else tuple(slots[i] for _ in chunks for i in range(images))
        for name, layer in spec.layers.items():
            if layer.reader is None:
                continue
            keys = tuple(tuple((j, half) for j in sets[i] if (j, name, half) in tokens)
                         for half in chunks for i in range(images))
            size = {k: tokens[(k[0], name, k[1])].hidden.shape[0] for row in keys for k in row}
            memo_key = (keys, tuple(sorted(size.items())))
            if memo_key not in memo:  # layers of one level read alike: group once
                memo[memo_key] = self._groups(step, keys, size, tags)
            groups[name] = memo[memo_key]
            if masks is not None:
                level = levels.get(layer.factor) if reader.share and name in sharing else None
                routes[name] = self._routes(step_key, layer, groups[name], tokens, len(chunks),
                                            self._routing(step_key, latent_hw, layer.factor, masks), level)
        return Reading(tokens, groups, reader.share, routes if masks is not None else None)

    def _slot_banks(self, masks: Masks) -> tuple:
        """Per image, the bank each slot reads: the bank of the panel's k-th character (by name, among the banks the
        reader routes to the image). BankMismatchError when the masks' story names a character the image reads no
        bank of."""
        reader, out = self.spec.reader, []
        for image, cols in enumerate(masks.named):
            allowed = reader.banks_for(image)
            by_name = {reader.banks[j].name: j for j in reversed(allowed)}
            missing = [masks.names[c] for c in cols if masks.names[c] not in by_name]
            if missing:
                raise BankMismatchError(
                    f"{READ_NODE}: panel {image + 1} names {missing} in SDN_CharacterMasks' story but reads no bank of "
                    f"them (it reads {[reader.banks[j].name for j in allowed]}): connect the same story to both "
                    f"nodes and a bank for every character")
            out.append(tuple(by_name[masks.names[c]] for c in cols))
        return tuple(out)

    def _routes(self, step_key, layer, groups: tuple, tokens: dict, chunks: int, route: Routing,
                level: Level | None) -> tuple:
        """Subject-masked reading of ``layer`` (roles.SelfAttention or dit.JointLayer): per group ``(visible (rows, K,
        E + S), slot (rows, N))`` (:class:`Reading`), E = the group's bank tokens (a DiT's ``extra`` rows are keys and
        values: ``layer.kv`` a token). Slot k of a row sees the tokens of its k-th bank whose region bit is set and,
        sharing, the CSA tokens of the batch inside its character's region (csa.region_visible)."""
        k = route.slots.shape[1]
        slot = self._cached(step_key, ("query slots", route.query_slot.shape[1], chunks),
                            lambda: route.query_slot.repeat(chunks, 1))
        shared = None if level is None else self._cached(
            step_key, ("shared visible", level.tokens, chunks),
            lambda: region_visible(route, level.plan.all_idx, slice(None)).repeat(chunks, 1, 1))
        out = []
        for group in groups:
            parts = []
            for (span, row_keys), banks in zip(group.parts, group.slots):
                visible = torch.zeros(k, group.extra // layer.kv, dtype=torch.bool, device=self.device)
                at = 0
                for j, half in row_keys:  # the part's bank tokens, bank by bank: visible to that bank's slot
                    bits = tokens[(j, layer.name, half)].bits
                    if j in banks:
                        visible[banks.index(j), at:at + bits.shape[0]] = bits
                    at += bits.shape[0]
                parts.append(visible.expand(span.stop - span.start, -1, -1))
            visible = torch.cat(parts)
            if shared is not None:
                visible = torch.cat((visible, shared[group.rows]), 2)
            out.append((visible, slot[group.rows]))
        return tuple(out)

    def _groups(self, step, keys: tuple, size: dict, tags: tuple | None = None) -> tuple:
        """Rows by number of bank tokens (one attention call each), each group's rows ordered part by part; a part
        holds the rows reading the same bank tokens (and, with ``tags``, per row the bank of each slot, the same
        slots)."""
        parts: dict = {}
        for row, row_keys in enumerate(keys):
            parts.setdefault((row_keys, None if tags is None else tags[row]), []).append(row)
        by_extra: dict = {}
        for (row_keys, tag), rows in parts.items():
            by_extra.setdefault(sum(size[k] for k in row_keys), []).append((row_keys, tag, rows))
        groups = []
        for extra, members in sorted(by_extra.items()):
            order, spans = [], []
            for row_keys, _, rows in members:
                spans.append((slice(len(order), len(order) + len(rows)), row_keys))
                order += rows
            slots = None if tags is None else tuple(tag for _, tag, _ in members)
            groups.append(ReadGroup(self._rows(step, tuple(order)), len(order), tuple(spans), extra, slots))
        return tuple(groups)

    def _rows(self, step, order: tuple):
        if order == tuple(range(order[0], order[0] + len(order))):
            return slice(order[0], order[0] + len(order))
        return self._cached(step, ("rows", order), lambda: torch.tensor(order).to(self.device, non_blocking=True))


__all__ = ["CONTEXT", "RUN", "Call", "Level", "Masks", "Run", "plan_for", "reference_draw", "gate_open", "level_tokens"]
