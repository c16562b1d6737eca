"""Select, batch and merge story panels for StoryDiffusion's reference mode.

The reference app (HVision-NKU/StoryDiffusion) draws the first ``id_length`` panels of a character together
("write", recording a character bank), then every other panel against that bank ("read"), one batch at a time
so peak memory does not grow with story length. These helpers do the bookkeeping on the ``SDN_STORY`` payload
(:class:`~.parser.Story`) and on per-panel CONDITIONING (one entry whose ``cond`` has one row per panel, see
``encode.py``):

* :func:`reference_panels` / :func:`rest_panels` / :func:`select_panels`: which panels are references.
* :func:`slice_conditioning`: the rows of the selected panels (cond, pooled_output, attention_mask...).
* :func:`split_batches`: consecutive batches of at most ``batch_size`` panels.
* :func:`concat_conditioning`, :func:`reference_rows`: reference rows in front of a batch's rows (bank-free
  reference mode); :func:`latent_layout`: the per-image latent shape of a batch.
* :func:`merge_panels`: panel images drawn in several runs back into story order (by ``Panel.index``).

Sub-stories keep each panel's ORIGINAL ``index`` (its position in the full story), the full ``characters``
dict and the style, so captions, bank routing and merging stay correct whichever subset a node sees.
Pure torch + the parser: no ComfyUI import.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import NodeInputError
from .parser import Panel, Story

PARTS = ("references", "rest", "all")
ALL_CHARACTERS = "*"  # select_panels' character meaning every character's references


def _is_solo(panel: Panel, name: str) -> bool:
    return panel.characters == (name,) and not panel.no_character


def reference_panels(story: Story, name: str, count: int, node: str = "SDN_StoryPanels") -> tuple[Panel, ...]:
    """The first ``count`` panels that name character ``name`` alone (the reference app's id images).

    A reference panel names exactly that one character (no other character, not ``[NC]``). Raises
    NodeInputError(node, "character") for an unknown name, NodeInputError(node, "reference_count") for
    ``count < 1`` or when the story has fewer such panels (the message lists the story lines that name the
    character alone and those that name it with others).
    """
    if name not in story.characters:
        raise NodeInputError(node, "character", f"one of the story's characters "
                             f"({', '.join(story.characters) or 'none'}), or {ALL_CHARACTERS} for every character's",
                             got=repr(name))
    if count < 1:
        raise NodeInputError(node, "reference_count", "at least 1", got=str(count))
    solo = [p for p in story.panels if _is_solo(p, name)]
    if len(solo) < count:
        shared = [p.line for p in story.panels if name in p.characters and not _is_solo(p, name)]
        got = (f"{len(solo)} panel(s) naming only [{name}]"
               + (f" (story lines {', '.join(str(p.line) for p in solo)})" if solo else "")
               + (f"; lines {', '.join(map(str, shared))} name [{name}] together with other characters"
                  if shared else ""))
        raise NodeInputError(node, "reference_count", (
            f"at least {count} panel(s) that name [{name}] and no other character (add panel lines such as "
            f"'[{name}] portrait, looking at the viewer', or lower reference_count)"), got=got)
    return tuple(solo[:count])


def reference_indices(story: Story, count: int) -> dict[str, tuple[int, ...]]:
    """For every character of the story: the ``Panel.index`` of its first ``count`` solo panels.

    Characters with fewer solo panels get the ones they have (possibly none): a character whose bank is loaded
    from a file may have no reference panel in this story.
    """
    if count < 1:
        raise NodeInputError("SDN_StoryPanels", "reference_count", "at least 1", got=str(count))
    return {name: tuple(p.index for p in story.panels if _is_solo(p, name))[:count] for name in story.characters}


def rest_panels(story: Story, count: int) -> tuple[Panel, ...]:
    """Every panel that is not a reference of any character (``count`` references per character)."""
    refs = {i for idx in reference_indices(story, count).values() for i in idx}
    return tuple(p for p in story.panels if p.index not in refs)


def sub_story(story: Story, panels, carried: int = 0) -> Story:
    """A Story holding ``panels`` (which keep their original ``index``), same characters and style; ``carried``
    of them are reference panels in front of a batch (see :attr:`Story.carried`)."""
    return replace(story, panels=tuple(panels), carried=carried)


def select_panels(story: Story, part: str, character: str = "", count: int = 1,
                  node: str = "SDN_StoryPanels") -> tuple[tuple[int, ...], Story]:
    """(positions, sub_story) of the panels of ``part``.

    part: "references" (of ``character``; empty = the story's first character; ``*`` = every character's, in
    story order, e.g. all references in front of bank-free batches), "rest" (not a reference of any character)
    or "all". positions: 0-based positions of the selected panels inside ``story.panels``
    (rows of the story's conditioning; not necessarily equal to ``Panel.index`` when ``story`` is itself a
    sub-story). Errors: NodeInputError for an unknown part, unknown character, reference_count < 1, too few
    reference panels, and an empty "rest" selection.
    """
    if part not in PARTS:
        raise NodeInputError(node, "part", f"one of {', '.join(PARTS)}", got=repr(part))
    if part == "references":
        name = character.strip() or next(iter(story.characters), "")
        if not name:
            raise NodeInputError(node, "story", "a story that defines at least one character (for references)")
        names = story.characters if name == ALL_CHARACTERS else (name,)
        chosen = {p.index for n in names for p in reference_panels(story, n, count, node)}
    elif part == "rest":
        chosen = {p.index for p in rest_panels(story, count)}
        if not chosen:
            raise NodeInputError(node, "part", "a story with panels left after the references (every panel is a "
                                 f"reference with reference_count={count})")
    else:
        if count < 1:
            raise NodeInputError(node, "reference_count", "at least 1", got=str(count))
        chosen = {p.index for p in story.panels}
    positions = tuple(pos for pos, p in enumerate(story.panels) if p.index in chosen)
    return positions, sub_story(story, (story.panels[i] for i in positions))


def slice_conditioning(conditioning: list, rows, total: int, node: str, input_name: str = "positive") -> list:
    """Keep rows ``rows`` (positions, in that order) of a per-panel CONDITIONING of ``total`` panels.

    Every entry ``[cond, extras]`` with ``cond.shape[0] == total`` is sliced along dim 0, and so is every
    tensor in ``extras`` whose dim 0 is ``total`` (``pooled_output`` ``(P, D)``, ``attention_mask`` ``(P, T)``...);
    other extras are kept as they are. An entry of batch 1 applies to every panel and is kept unchanged
    (e.g. one prompt for all panels). Any other batch size raises NodeInputError: the conditioning does not
    belong to this story. The input list and its tensors are never modified.
    """
    rows = list(rows)
    if not isinstance(conditioning, list) or not conditioning:
        raise NodeInputError(node, input_name, "a CONDITIONING (from SDN_StoryPrompt)", got=type(conditioning).__name__)
    out = []
    for entry in conditioning:
        cond, extras = entry[0], entry[1]
        n = cond.shape[0]
        if n == 1 and total != 1:
            out.append([cond, dict(extras)])
            continue
        if n != total:
            raise NodeInputError(node, input_name, f"a per-panel conditioning with one row per panel of the story "
                                 f"({total} panels; connect the positive and story outputs of the same node)",
                                 got=f"{n} rows")
        idx = torch.tensor(rows, dtype=torch.long, device=cond.device)
        new = {}
        for key, value in extras.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
                value = value.index_select(0, idx.to(value.device))
            new[key] = value
        out.append([cond.index_select(0, idx), new])
    return out


def split_batches(count: int, batch_size: int) -> list[range]:
    """Positions 0..count-1 in consecutive batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise NodeInputError("SDN_StoryBatches", "batch_size", "at least 1", got=str(batch_size))
    return [range(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def same_value(a, b) -> bool:
    """Equal conditioning extras: tensors of one shape and equal values, or equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b.to(a))
    try:
        return bool(a == b)
    except Exception:
        return a is b


def concat_conditioning(first: list, second: list, rows: tuple[int, int], node: str, first_input: str,
                        second_input: str) -> list:
    """Rows of ``first`` then rows of ``second``, entry by entry: two per-panel CONDITIONINGs of the same text
    encoder (same number of entries, token count, width and extras) for ``rows`` = (first's panels, second's
    panels). An entry of batch 1 (one prompt for all its panels) is repeated to its side's panels first; then
    ``cond`` and every extra tensor with one row per panel (``pooled_output``, ``attention_mask``...) are
    concatenated along dim 0; other extras must be equal. Raises NodeInputError naming ``first_input`` (the rows
    added in front) when the two do not fit together. The inputs are never modified.
    """
    first, second = (_repeat_single(c, n) for c, n in zip((first, second), rows))
    if len(first) != len(second):
        raise NodeInputError(node, first_input, f"a CONDITIONING with as many entries as {second_input} "
                             f"({len(second)})", got=f"{len(first)} entries")
    out = []
    for (a, ea), (b, eb) in zip(first, second):
        if a.shape[1:] != b.shape[1:]:
            raise NodeInputError(node, first_input, f"conditioning of the same text encoder and token count as "
                                 f"{second_input} ({tuple(b.shape[1:])} per panel; encode both with the same "
                                 f"SDN_StoryPrompt)", got=f"{tuple(a.shape[1:])} per panel")
        if set(ea) != set(eb):
            raise NodeInputError(node, first_input, f"the same conditioning extras as {second_input} ({sorted(eb)})",
                                 got=str(sorted(ea)))
        extras = {}
        for key in ea:
            x, y = ea[key], eb[key]
            per_row = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.ndim > 0 and y.ndim > 0 \
                and x.shape[0] == a.shape[0] and y.shape[0] == b.shape[0] and x.shape[1:] == y.shape[1:]
            if per_row:
                extras[key] = torch.cat((x, y.to(x))).to(x.device)
            elif same_value(x, y):
                extras[key] = x
            else:
                raise NodeInputError(node, first_input, f"conditioning extra {key!r} shaped like {second_input}'s "
                                     f"(one row per panel, or equal)", got=f"a different {key!r}")
        out.append([torch.cat((a, b.to(a))), extras])
    return out


def _repeat_single(conditioning: list, panels: int) -> list:
    """Entries of batch 1 repeated to ``panels`` rows (with their one-row extras); others unchanged."""
    out = []
    for cond, extras in conditioning:
        if cond.shape[0] == 1 and panels != 1:
            extras = {k: v.expand(panels, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim > 0
                      and v.shape[0] == 1 else v for k, v in extras.items()}
            cond = cond.expand(panels, *cond.shape[1:])
        out.append([cond, extras])
    return out


def reference_rows(node: str, positive, story) -> tuple[list | None, tuple]:
    """(reference conditioning, reference panels) of bank-free reference mode, or (None, ()) without it."""
    if positive is None and story is None:
        return None, ()
    if positive is None or story is None:
        missing = "reference_positive" if positive is None else "reference_story"
        raise NodeInputError(node, missing, "a connection (reference_positive and reference_story go together)")
    if not story.panels:
        raise NodeInputError(node, "reference_story", "at least one reference panel")
    count = len(story.panels)
    return slice_conditioning(positive, range(count), count, node, "reference_positive"), tuple(story.panels)


def latent_layout(node: str, latent, width: int, height: int) -> tuple[tuple, dict]:
    """(per-image latent shape, other keys to copy) from a template LATENT, else the SD layout of width x height
    (what Empty Latent Image makes: 4 channels at 1/8 size)."""
    if latent is None:
        return (4, height // 8, width // 8), {}
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
        raise NodeInputError(node, "empty_latent", "a LATENT with a samples tensor (batch, channels, height, width)",
                             got=type(samples).__name__ if not isinstance(samples, torch.Tensor)
                             else f"shape {tuple(samples.shape)}")
    keep = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
    return tuple(samples.shape[1:]), keep


def merge_panels(groups, node: str = "SDN_MergePanels") -> tuple[torch.Tensor, tuple[Panel, ...]]:
    """Images of several runs back into story order.

    groups: iterable of ``(input_name, images, story)``: ``images`` an IMAGE batch ``(B, H, W, C)`` whose
    image ``i`` is panel ``story.panels[i]``. Returns ``(images (N, H, W, C), panels)`` sorted by
    ``Panel.index``. Missing indices are allowed (a subset of the story). The ``carried`` reference panels in
    front of a batch (bank-free reference mode) are kept once, from the first item that has them, and dropped
    where another item holds the same panel. Raises NodeInputError for a batch
    whose size differs from its story's panel count, a panel index that appears twice, images of different
    sizes (both sizes named), or no panels at all.
    """
    seen: dict[int, str] = {}
    carried: dict = {}
    items = []
    size = None
    for name, images, story in groups:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise NodeInputError(node, name, "an IMAGE batch", got=type(images).__name__)
        if not isinstance(story, Story):
            raise NodeInputError(node, name.replace("images", "story"), "an SDN_STORY", got=type(story).__name__)
        if images.shape[0] != len(story.panels):
            raise NodeInputError(node, name, f"one image per panel of its story item ({len(story.panels)} panels, "
                                 f"story lines {', '.join(str(p.line) for p in story.panels)})",
                                 got=f"{images.shape[0]} images")
        shape = tuple(images.shape[1:])
        if size is None:
            size = (shape, name)
        elif shape != size[0]:
            raise NodeInputError(node, name, f"images of one size ({size[1]} has {size[0][1]}x{size[0][0]} px "
                                 f"with {size[0][2]} channels)",
                                 got=f"{shape[1]}x{shape[0]} px with {shape[2]} channels")
        for i, panel in enumerate(story.panels):
            if i < story.carried:
                carried.setdefault(panel.index, (images[i], panel))
                continue
            if panel.index in seen:
                raise NodeInputError(node, name, "each panel once", got=(
                    f"panel {panel.index + 1} (story line {panel.line}) in both {seen[panel.index]} and {name}"))
            seen[panel.index] = name
            items.append((panel.index, images[i], panel))
    items += [(index, image, panel) for index, (image, panel) in carried.items() if index not in seen]
    if not items:
        raise NodeInputError(node, "images", "at least one panel image")
    items.sort(key=lambda t: t[0])
    device = items[0][1].device
    return torch.stack([t[1].to(device) for t in items]), tuple(t[2] for t in items)
