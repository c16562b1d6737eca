"""Character banks: the reference app's write/read protocol, keyed by step and layer, stored as compactly as its own.

StoryDiffusion's reference app (HVision-NKU/StoryDiffusion) draws a character's reference images together
with CSA ("write"), keeps the sampled tokens of every reference per layer and per step, then draws every other
panel attending to its own tokens plus that store ("read"), so later panels cost the memory of one panel.

Like the reference app, a bank holds the *hidden states* of the sampled reference tokens (the layer's input,
before its key/value projections), per ``(step, layer, CFG half)``: :class:`Tokens` of shape ``(R * M, C)``
with R = reference images, M = round(rate * N) tokens per image, C = the layer's width. The reading layer
projects them with its own to_k/to_v, so a LoRA or low-VRAM casting applies to them as to every other token.
Storage: fp8 (``float8_e4m3fn`` with one float32 scale per token, as FP8 key/value caches in LLM serving), fp16,
bf16 or fp32, in CPU memory (moved to the compute device one step at a time while reading) or on the compute
device. Only what a read can use is kept: steps and layers where CSA was active (with the ``storydiffusion``
schedule, no step 0 and only the layer calls its gates keep).

Size: sum over recorded (step, layer, half) of R * M * C * bytes(dtype) (+ 4 * R * M for fp8 scales). SDXL at
1024 px, 1 reference, rate 0.5, 35 steps, both halves, every step and layer: 2 halves x 35 x (6 x 2048 x 640 +
30 x 512 x 1280) x 2 B ~ 3.85 GB in fp16 (the reference app's own size), ~1.93 GB in fp8; the reference app's
schedule (no step 0, a fifth of the layer calls skipped) records about 0.76 of that. SD1.5 at 512 px in fp16:
~0.48 GB. It grows linearly with references, steps, rate and layers: a start/end percent range, lower rates or
fewer blocks shrink it.

Subject masks (issue 10): a bank recorded by a model with subject-masked CSA (and SDN_CharacterMasks' model, every
reference panel naming the bank's one character) also keeps, per entry, one region bit a recorded token (bool
``(R * M,)``, 1 B each: + 1/C of the size; a DiT entry's ``2 * R * M`` rows are the tokens' keys then their values,
and bit t covers key row t and value row R * M + t): whether the token lay in that character's region at that step,
from the routing CSA used there (regions.routing). Reading with subject masks shows a panel's character only its bank's
tokens whose bit is set; banks without bits (recorded without subject masks, every earlier file) are refused
there and read whole elsewhere.

A bank records the schedule (sigmas), the latent size and a fingerprint of the model; reading under a
different one is refused (BankMismatchError) rather than silently misaligned.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import StoryDiffusionError
from ..files import write_new

FORMAT = "sdn-character-bank"
VERSION = 2  # 1: projected keys and values (2x the size); 2: hidden states, fp8 with per-token scales
DTYPES = {"fp8": torch.float8_e4m3fn, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class BankMismatchError(StoryDiffusionError, ValueError):
    """A bank is read under another schedule, resolution or model than it was recorded with."""


class BankFileError(StoryDiffusionError, ValueError):
    """A character bank file is missing, corrupt or of another format/version."""


class BankSizeError(StoryDiffusionError, ValueError):
    """A recording would store more than the user's limit (SDN_RecordCharacterBank's max_size_gb)."""


# A bank's kind by its layer names: a UNet's self-attention layers (layer_name()) keep hidden states (R*M, C); a
# DiT's joint-attention blocks ("double.3", "single.10") keep keys then values after RoPE (2*R*M, heads*dim).
KINDS = {"unet": re.compile(r"(input|middle|output)\.\d+\.\d+"), "dit": re.compile(r"(double|single)\.\d+")}


def bank_kind(layer: str) -> str | None:
    """"unet" or "dit" for a bank layer name, None for neither."""
    return next((kind for kind, pattern in KINDS.items() if pattern.fullmatch(layer)), None)


def entry_bytes(rows: int, channels: int, dtype: torch.dtype, bits: int = 0) -> int:
    """Bytes of one bank entry of ``rows`` rows x ``channels`` in ``dtype`` (fp8: + one float32 scale a row), plus
    ``bits`` region bits (one byte each: subject masks)."""
    return rows * channels * dtype.itemsize + (4 * rows if dtype == torch.float8_e4m3fn else 0) + bits


def layer_name(block, block_index) -> str:
    """``("output", 3), 0`` -> ``"output.3.0"``: the bank's layer key (ComfyUI's attn1 patch key)."""
    return f"{block[0]}.{int(block[1])}.{int(block_index)}"


def model_fingerprint(model_patcher) -> str:
    """Identify the weights that produce the keys/values: architecture, config, base weights, weight patches.

    Cheap (no full hash): model class, UNet config, a checksum of a few attention projection weights, and every
    weight patch (LoRAs and the like) with its key, strengths and content (:func:`_feed`), so two LoRAs with the
    same keys and strengths differ. Loading state never changes it: base weights are read from the patcher's
    backup when ComfyUI has applied patches in place (a loaded model), and patches from ``patches``, which
    holds them whether they are applied in place, applied on the fly during forward (lowvram, current
    ComfyUI's dynamic VRAM) or not applied yet.
    """
    model = model_patcher.model
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = getattr(getattr(model, "model_config", None), "unet_config", {}) or {}
    h.update(json.dumps({k: str(v) for k, v in sorted(cfg.items())}).encode())
    sd = model.state_dict()
    backup = getattr(model_patcher, "backup", {}) or {}
    probes = [k for k in sorted(sd) if k.startswith("diffusion_model.") and k.endswith("attn1.to_k.weight")][:4] or [
        k for k in sorted(sd) if k.startswith("diffusion_model.") and "attn" in k and k.endswith(".weight")][:4]  # DiTs
    for k in probes:
        w = (backup[k].weight if k in backup else sd[k]).detach().float().flatten()
        h.update(k.encode())
        h.update(repr((round(float(w.sum()), 4), round(float(w.abs().sum()), 4),
                       [round(float(x), 6) for x in w[:8]])).encode())
    for key in sorted(getattr(model_patcher, "patches", {}) or {}):
        h.update(key.encode())
        for patch in model_patcher.patches[key]:  # (strength_patch, data, strength_model, offset, function)
            _feed(h, patch)
    return h.hexdigest()[:32]


_DIGEST_SAMPLES = 4096  # evenly spaced values hashed per patch tensor: any two trained/random tensors differ


def _feed(h, value) -> None:
    """Hash a weight patch's content into ``h``, whatever form ComfyUI stores it in: a bare tensor,
    ``("diff", (tensor,))``, ``("lora", (up, down, alpha, ...))``, a weight adapter object with ``.weights``
    (current ComfyUI), nested patch lists. Tensors count by shape, dtype and the exact bytes of up to
    ``2 x _DIGEST_SAMPLES`` evenly spaced elements (bytes, not sums: the same on every device); functions by
    qualified name; other objects by class (their repr may hold a memory address).
    """
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _DIGEST_SAMPLES)].cpu().contiguous()
        h.update(f"tensor{tuple(value.shape)}{value.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(repr(value).encode())
    elif isinstance(value, (tuple, list)):
        h.update(b"(")
        for item in value:
            _feed(h, item)
        h.update(b")")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _feed(h, value[k])
    else:
        h.update(getattr(value, "__qualname__", type(value).__qualname__).encode())
        if hasattr(value, "weights"):
            _feed(h, value.weights)


class Tokens(NamedTuple):
    """Hidden states of sampled reference tokens: ``hidden`` ``(R * M, C)`` in the storage dtype (a DiT's: ``(2 * R *
    M, C)``, the tokens' keys then their values); for fp8, ``scale`` (one float32 a row, ``(rows, 1)``) with value =
    hidden * scale, else None; ``bits`` bool ``(R * M,)``, one a token (a DiT: for its key and its value row), when
    recorded with subject masks: the token lies in the region of the character its reference's panel names (at
    that step, from the routing CSA used), else None."""

    hidden: torch.Tensor
    scale: torch.Tensor | None = None
    bits: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)

    def to(self, device) -> "Tokens":
        return Tokens(*(None if t is None else t.to(device, non_blocking=True) for t in self))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``(R * M, C)`` in ``dtype``."""
        if self.scale is None:
            return self.hidden.to(dtype)
        return (self.hidden.float() * self.scale).to(dtype)


def store(dest: Tokens, x: torch.Tensor, non_blocking: bool) -> None:
    """Write hidden states ``x`` ``(R * M, C)`` (any float dtype, any device) into ``dest``.

    fp8 destinations get one scale per token (its largest magnitude maps to 448), so every token uses the
    format's whole range. ``non_blocking``: ``dest`` is pinned CPU memory and nothing waits for the copy.
    """
    if dest.scale is None:
        dest.hidden.copy_(x.to(dest.hidden.dtype), non_blocking=non_blocking)
        return
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / FP8_MAX
    dest.hidden.copy_((x / scale).to(dest.hidden.dtype), non_blocking=non_blocking)
    dest.scale.copy_(scale, non_blocking=non_blocking)


class RecordingRun:
    """The entries one sampling run records: one buffer per (step, CFG half) holding every layer recorded at
    that step (a view per layer) in the storage dtype.

    With CPU storage and a CUDA compute device the buffers are pinned and written by non-blocking copies, so
    sampling never waits for them; :meth:`finish` synchronises once, at the end of the run, and hands the
    entries to the recorder. A run that does not finish hands nothing over.
    """

    def __init__(self, recorder: "BankRecorder", schedule: tuple, latent_hw: tuple, refs: int, device,
                 masked: bool = False):
        self.recorder, self.schedule, self.latent_hw, self.refs = recorder, schedule, latent_hw, refs
        self.masked = masked  # subject masks: every entry keeps its tokens' region bits
        self.subject = None  # the character the references name (subject masks), set while recording
        self.device = torch.device(device)
        self.store_device = self.device if recorder.storage_device == "compute" else torch.device("cpu")
        self.pinned = self.store_device.type == "cpu" and self.device.type == "cuda"
        self.buffers: dict = {}
        self.written: set = set()

    def targets(self, step: int, half: int, layers: tuple) -> dict:
        """``{layer: Tokens}`` to write step ``step``'s half ``half`` into; ``layers``: ``((name, rows, channels,
        tokens), ...)``, every layer that can be recorded at this step, its entry's rows of channels and the recorded
        tokens (one region bit each with subject masks; a DiT's rows are keys then values: 2 a token). The buffer is
        allocated once."""
        views = self.buffers.get((step, half))
        if views is None:
            views = self.buffers[(step, half)] = self._allocate(layers)
        return views

    def _allocate(self, layers: tuple) -> dict:
        dtype = self.recorder.storage_dtype
        kw = dict(device=self.store_device, pin_memory=self.pinned)
        flat = torch.empty(sum(rows * c for _, rows, c, _ in layers), dtype=dtype, **kw)
        scales = torch.empty(sum(rows for _, rows, _, _ in layers), **kw) if dtype == torch.float8_e4m3fn else None
        bits = torch.empty(sum(t for *_, t in layers), dtype=torch.bool, **kw) if self.masked else None
        views, at, at_row, at_token = {}, 0, 0, 0
        for name, rows, c, tokens in layers:
            hidden = flat[at:at + rows * c].view(rows, c)
            scale = None if scales is None else scales[at_row:at_row + rows].view(rows, 1)
            views[name] = Tokens(hidden, scale, None if bits is None else bits[at_token:at_token + tokens])
            at, at_row, at_token = at + rows * c, at_row + rows, at_token + tokens
        return views

    def write(self, key: tuple, dest: Tokens, x: torch.Tensor, bits: torch.Tensor | None = None) -> None:
        """Record ``x`` as entry ``key`` = (step, layer, half) into ``dest`` (from :meth:`targets`), with its
        tokens' region ``bits`` (bool ``(R * M,)``) when the run is masked."""
        store(dest, x, self.pinned)
        if dest.bits is not None:
            dest.bits.copy_(bits, non_blocking=self.pinned)
        self.written.add(key)

    def finish(self) -> None:
        if self.pinned:  # the run's one wait: every non-blocking copy has landed
            torch.cuda.current_stream(self.device).synchronize()
        entries = {key: self.buffers[(key[0], key[2])][key[1]] for key in sorted(self.written)}
        self.recorder.publish(entries, self.schedule, self.latent_hw, self.refs, self.subject)


@dataclass
class BankRecorder:
    """Filled by each sampling run of a recording model; mutable, owned by one node output.

    A run that finishes replaces what the recorder held with what it recorded.
    """

    storage_dtype: torch.dtype = torch.float16
    storage_device: str = "cpu"  # "cpu", or "compute" to keep entries where they were computed
    fingerprint: str = ""
    settings: dict = field(default_factory=dict)
    entries: dict = field(default_factory=dict)
    schedule: tuple = ()
    latent_hw: tuple = ()
    reference_count: int = 0
    max_bytes: int = 0  # refuse runs whose estimate exceeds it (0: no limit)
    estimate: int = 0  # the last run's estimated size in bytes
    subject: str | None = None  # recorded with subject masks: the character the reference panels name

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies options: keep one recorder
        return self

    def check_size(self, estimate: int, formula: str) -> None:
        """Before a run stores anything: keep ``estimate`` (bytes) and raise BankSizeError (naming
        SDN_RecordCharacterBank's max_size_gb, the estimate and its ``formula``) when it exceeds ``max_bytes``."""
        self.estimate = estimate
        if self.max_bytes and estimate > self.max_bytes:
            raise BankSizeError(
                f"SDN_RecordCharacterBank: input 'max_size_gb': this recording would store an estimated "
                f"{estimate / 1e9:.2f} GB ({estimate} bytes = {formula}), above the limit of "
                f"{self.max_bytes / 1e9:.2f} GB. Nothing was recorded. Use bank-free reference mode instead (put the reference panels in front of every "
                f"batch with SDN_StoryBatches and set SDN_ConsistentSelfAttention's reference_count to their "
                f"number: the same panels, no bank), or shrink the bank (fewer steps, a start/end percent range, "
                f"lower rates, fewer blocks, fp8), or raise max_size_gb (0 = no limit)")

    def start(self, schedule: tuple, latent_hw: tuple, refs: int, device, masked: bool = False) -> RecordingRun:
        return RecordingRun(self, schedule, latent_hw, refs, device, masked)

    def publish(self, entries: dict, schedule: tuple, latent_hw: tuple, refs: int, subject: str | None = None) -> None:
        self.entries, self.schedule, self.latent_hw, self.reference_count = entries, schedule, latent_hw, refs
        self.subject = subject


@dataclass(frozen=True)
class CharacterBank:
    """An immutable recorded bank: ``entries[(step, layer, half)] = Tokens``, each ``(R*M, C)``, with region bits
    in every entry (recorded with subject masks: :attr:`masked`) or in none.

    ``half`` is ComfyUI's cond_or_uncond flag (0 positive, 1 negative). ``schedule``: the sigmas the reference
    panels were sampled with (rounded); ``latent_hw``: their latent size.
    """

    name: str
    description: str
    entries: dict
    schedule: tuple
    latent_hw: tuple
    fingerprint: str
    reference_count: int
    settings: dict

    def __post_init__(self):  # entries given as plain (hidden, scale[, bits]) tuples become Tokens
        object.__setattr__(self, "entries", {key: Tokens(*value) for key, value in self.entries.items()})

    @property
    def masked(self) -> bool:
        """Recorded with subject masks: every entry holds its tokens' region bits."""
        return bool(self.entries) and all(t.bits is not None for t in self.entries.values())

    @staticmethod
    def from_recorder(rec: BankRecorder, name: str, description: str) -> "CharacterBank":
        return CharacterBank(name, description, dict(rec.entries), rec.schedule, rec.latent_hw, rec.fingerprint,
                             rec.reference_count, dict(rec.settings))

    @property
    def size_bytes(self) -> int:
        return sum(tokens.nbytes for tokens in self.entries.values())

    @property
    def layers(self) -> set:
        return {key[1] for key in self.entries}

    @property
    def kind(self) -> str:
        """"dit" (keys and values of DiT blocks) or "unet" (hidden states of UNet layers)."""
        return "dit" if any(bank_kind(layer) == "dit" for layer in self.layers) else "unet"

    @cached_property
    def steps(self) -> dict:
        """``{step: {(layer, half): Tokens}}``."""
        out: dict = {}
        for (step, layer, half), tokens in self.entries.items():
            out.setdefault(step, {})[(layer, half)] = tokens
        return out

    def summary(self) -> str:
        first = next(iter(self.entries.values()), None)
        dtype = _DTYPE_NAMES.get(first.hidden.dtype, first.hidden.dtype) if first else None
        device = first.hidden.device if first else None
        what = "DiT blocks (keys and values)" if self.kind == "dit" else "layers"
        masks = ", with subject masks" if self.masked else ""
        return (f"character bank '{self.name}': {self.reference_count} reference image(s), {len(self.steps)} steps, "
                f"{len(self.layers)} {what}{masks}, {self.size_bytes / 2**20:.1f} MiB ({dtype}, on {device}); "
                f"latent {self.latent_hw[0]}x{self.latent_hw[1]}, {max(len(self.schedule) - 1, 0)}-step schedule")

    def check_schedule(self, schedule: tuple, latent_hw: tuple):
        """Raise BankMismatchError unless the read run uses the recorded schedule and latent size."""
        if latent_hw != self.latent_hw:
            raise BankMismatchError(
                f"character bank '{self.name}' was recorded at latent size {self.latent_hw[0]}x{self.latent_hw[1]} "
                f"({self.latent_hw[0] * 8}x{self.latent_hw[1] * 8} px); these panels are {latent_hw[0]}x{latent_hw[1]} "
                f"({latent_hw[0] * 8}x{latent_hw[1] * 8} px). Draw them at the recorded size.")
        if schedule != self.schedule:
            raise BankMismatchError(
                f"character bank '{self.name}' was recorded with a {len(self.schedule) - 1}-step schedule "
                f"(sigmas {_short(self.schedule)}); this sampler uses {len(schedule) - 1} steps "
                f"(sigmas {_short(schedule)}). Use the same steps, scheduler and denoise as the recording.")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the bank to ``path`` (safetensors: tensors ``<i>.h`` (hidden states), for fp8 ``<i>.s`` (scales),
        with subject masks ``<i>.b`` (region bits, bool); everything else in the metadata).

        Never replaces an existing file unless ``overwrite`` (``FileExistsError`` naming it).
        """
        import comfy.utils

        tensors, index = {}, []
        for i, (key, tokens) in enumerate(sorted(self.entries.items())):
            tensors[f"{i}.h"] = tokens.hidden.detach().cpu().contiguous()
            for suffix, t in (("s", tokens.scale), ("b", tokens.bits)):
                if t is not None:
                    tensors[f"{i}.{suffix}"] = t.detach().cpu().contiguous()
            index.append(list(key))
        meta = {"format": FORMAT, "version": str(VERSION), "name": self.name, "description": self.description,
                "schedule": json.dumps(list(self.schedule)), "latent_hw": json.dumps(list(self.latent_hw)),
                "fingerprint": self.fingerprint, "reference_count": str(self.reference_count), "kind": self.kind,
                "settings": json.dumps(self.settings), "index": json.dumps(index)}
        return write_new(path, lambda tmp: comfy.utils.save_torch_file(tensors, tmp, metadata=meta), overwrite)

    @staticmethod
    def load(path: str | Path) -> "CharacterBank":
        """Read a bank written by ``save``; every metadata field, tensor name, shape and dtype is checked first.

        Raises ``BankFileError`` naming the file and what is wrong: unreadable/corrupt file, another format or
        version (version 1 files, from before banks kept hidden states, say how to re-record), a missing or
        malformed metadata field, tensors that do not match the index or each other. A file without region bits
        (``<i>.b``) is a bank recorded without subject masks.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise BankFileError(f"{path.name}: not a character bank (format {meta.get('format')!r}, "
                                        f"expected {FORMAT!r})")
                if meta.get("version") == "1":
                    raise BankFileError(
                        f"{path.name}: a character bank of format version 1 (projected keys and values, written by "
                        f"an earlier version of this pack); this pack reads version {VERSION} (hidden states, half "
                        f"the size) and cannot convert it. Re-record the character: sample its reference panels "
                        f"again through SDN_RecordCharacterBank (same seed, prompts and CSA settings give the same "
                        f"character) and save the new bank with SDN_SaveCharacterBank")
                if meta.get("version") != str(VERSION):
                    raise BankFileError(f"{path.name}: character bank version {meta.get('version')!r} is not "
                                        f"supported (this pack reads version {VERSION})")
                try:
                    fields = _metadata_fields(meta)
                    fp8, bits = _check_tensors(f, fields["index"], fields["reference_count"], fields.pop("kind"))
                except ValueError as e:
                    raise BankFileError(f"{path.name}: invalid character bank: {e}") from e
                entries = {key: Tokens(*(f.get_tensor(f"{i}.{suffix}") if present else None
                                         for suffix, present in (("h", True), ("s", fp8), ("b", bits))))
                           for i, key in enumerate(fields.pop("index"))}
        except (OSError, SafetensorError) as e:
            raise BankFileError(f"{path.name}: unreadable character bank ({type(e).__name__}: {e})") from e
        return CharacterBank(entries=entries, **fields)


_STORED_DTYPES = {"F8_E4M3", "F16", "BF16", "F32"}  # safetensors' names of DTYPES
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _metadata_fields(meta: dict) -> dict:
    """A bank file's metadata (strings) -> CharacterBank's fields plus ``index``; ValueError names the bad field."""
    missing = [k for k in ("name", "schedule", "latent_hw", "fingerprint", "reference_count", "settings", "index")
               if k not in meta]
    if missing:
        raise ValueError(f"metadata lacks {missing}")

    def parsed(key, valid, expected):
        try:
            value = json.loads(meta[key])
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise ValueError(f"metadata '{key}' must be {expected}, got {_clip(meta[key])}")
        return value

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def count(x, least=1):
        return isinstance(x, int) and not isinstance(x, bool) and x >= least

    schedule = parsed("schedule", lambda s: isinstance(s, list) and len(s) >= 2 and all(map(number, s)),
                      "a JSON list of at least 2 sigmas")
    latent_hw = parsed("latent_hw", lambda s: isinstance(s, list) and len(s) == 2 and all(map(count, s)),
                       "a JSON list [height, width] of positive integers")
    settings = parsed("settings", lambda s: isinstance(s, dict), "a JSON object")
    refs = meta["reference_count"]
    if not (refs.isdecimal() and int(refs) >= 1):
        raise ValueError(f"metadata 'reference_count' must be a positive integer, got {_clip(refs)}")
    if not meta["name"].strip():
        raise ValueError("metadata 'name' is empty")

    kind = meta.get("kind", "unet")  # banks written before DiT banks are UNet banks
    if kind not in KINDS:
        raise ValueError(f"metadata 'kind' must be one of {sorted(KINDS)}, got {_clip(kind)}")
    layer = {"unet": "'input|middle|output.<block>.<depth>'", "dit": "'double|single.<block>'"}[kind]

    def entry(e):
        return (isinstance(e, list) and len(e) == 3 and count(e[0], 0) and isinstance(e[1], str)
                and KINDS[kind].fullmatch(e[1]) is not None and count(e[2], 0) and e[2] <= 1)

    index = parsed("index", lambda s: isinstance(s, list) and len(s) > 0 and all(map(entry, s)),
                   f"a non-empty JSON list of [step, {layer}, half 0|1] entries (a {kind} bank)")
    keys = [tuple(e) for e in index]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"metadata 'index' lists {list(twice)} twice")
    last, steps = max(k[0] for k in keys), len(schedule) - 1
    if last >= steps:
        raise ValueError(f"metadata 'index' has step {last}, the schedule has {steps} steps")
    return {"name": meta["name"], "description": meta.get("description", ""), "schedule": tuple(schedule),
            "latent_hw": tuple(latent_hw), "fingerprint": meta["fingerprint"], "reference_count": int(refs),
            "settings": settings, "index": keys, "kind": kind}


def _check_tensors(f, index: list, refs: int, kind: str) -> tuple[bool, bool]:
    """Check, from the file's header alone, that its tensors are exactly the index's entries (plus their
    scales for fp8, and region bits in every entry or none) and consistent: 2-D ``(R * M, C)`` with R = ``refs``
    (a DiT bank: ``(2 * R * M, C)``, keys then values), one shape per layer, one dtype throughout, scales
    ``(rows, 1)`` float32, bits ``(R * M,)`` bool. Returns whether the bank is fp8 and whether it has bits."""
    per_token = 2 if kind == "dit" else 1
    names = set(f.keys())
    hidden = [f"{i}.h" for i in range(len(index))]
    if not names >= set(hidden):
        raise ValueError(f"tensors do not match the index: missing {sorted(set(hidden) - names)[:4]}")
    dtypes = {f.get_slice(name).get_dtype() for name in hidden}
    if len(dtypes) != 1 or not dtypes <= _STORED_DTYPES:
        raise ValueError(f"tensor dtypes {sorted(dtypes)}: expected one of {sorted(_STORED_DTYPES)} throughout")
    fp8 = dtypes == {"F8_E4M3"}
    bits = any(name.endswith(".b") for name in names)
    wanted = set(hidden) | {f"{i}.{suffix}" for i in range(len(index))
                            for suffix, present in (("s", fp8), ("b", bits)) if present}
    if names != wanted:
        raise ValueError(f"tensors do not match the index: missing {sorted(wanted - names)[:4]}, unexpected "
                         f"{sorted(names - wanted)[:4]}")
    shapes = {}
    for i, (step, layer, half) in enumerate(index):
        shape, where = f.get_slice(f"{i}.h").get_shape(), f"entry {i} (step {step}, layer {layer}, half {half})"
        if len(shape) != 2:
            raise ValueError(f"{where}: hidden states of shape {shape}, expected 2-D (tokens, channels)")
        if shape[0] == 0 or shape[0] % (per_token * refs):
            raise ValueError(f"{where}: {shape[0]} rows are not a multiple of the {refs} reference images"
                             + (" x 2 (keys and values)" if per_token == 2 else ""))
        if shapes.setdefault(layer, shape) != shape:
            raise ValueError(f"{where}: shape {shape} differs from the layer's other entries {shapes[layer]}")
        if fp8:
            scale = f.get_slice(f"{i}.s")
            if scale.get_shape() != [shape[0], 1] or scale.get_dtype() != "F32":
                raise ValueError(f"{where}: fp8 scales of shape {scale.get_shape()} ({scale.get_dtype()}), expected "
                                 f"[{shape[0]}, 1] (F32)")
        if bits:
            flags = f.get_slice(f"{i}.b")
            if flags.get_shape() != [shape[0] // per_token] or flags.get_dtype() != "BOOL":
                raise ValueError(f"{where}: region bits of shape {flags.get_shape()} ({flags.get_dtype()}), "
                                 f"expected [{shape[0] // per_token}] (BOOL)")
    return fp8, bits


def _clip(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def schedule_key(sample_sigmas) -> tuple:
    """The schedule as a hashable tuple of sigmas rounded to 1e-4 relative precision."""
    return tuple(float(f"{float(s):.5g}") for s in sample_sigmas)


def _short(schedule: tuple) -> str:
    vals = [f"{s:.3g}" for s in schedule]
    return "[" + ", ".join(vals if len(vals) <= 6 else vals[:3] + ["..."] + vals[-2:]) + "]"
