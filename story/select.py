"""Select, batch and merge story panels for StoryDiffusion's reference mode.

The reference app (HVision-NKU/StoryDiffusion) draws the first ``id_length`` panels of a character together
("write", recording a character bank), then every other panel against that bank ("read"), one batch at a time
so peak memory does not grow with story length. These helpers do the bookkeeping on the ``SDN_STORY`` payload
(:class:`~.parser.Story`) and on per-panel CONDITIONING (one entry whose ``cond`` has one row per panel, see
``encode.py``):

* :func:`reference_panels` / :func:`rest_panels` / :func:`select_panels`: which panels are references.
* :func:`slice_conditioning`: the rows of the selected panels (cond, pooled_output, attention_mask...).
* :func:`split_batches`: consecutive batches of at most ``batch_size`` panels.
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
        raise NodeInputError(node, "character", f"one of the story's characters ({', '.join(story.characters) or 'none'})",
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


def sub_story(story: Story, panels) -> Story:
    """A Story holding ``panels`` (which keep their original ``index``), same characters and style."""
    return replace(story, panels=tuple(panels))


def select_panels(story: Story, part: str, character: str = "", count: int = 1,
                  node: str = "SDN_StoryPanels") -> tuple[tuple[int, ...], Story]:
    """(positions, sub_story) of the panels of ``part``.

    part: "references" (of ``character``, empty = the story's first character), "rest" (not a reference of
    any character) or "all". positions: 0-based positions of the selected panels inside ``story.panels``
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
        chosen = {p.index for p in reference_panels(story, name, count, node)}
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


def merge_panels(groups, node: str = "SDN_MergePanels") -> tuple[torch.Tensor, tuple[Panel, ...]]:
    """Images of several runs back into story order.

    groups: iterable of ``(input_name, images, story)``: ``images`` an IMAGE batch ``(B, H, W, C)`` whose
    image ``i`` is panel ``story.panels[i]``. Returns ``(images (N, H, W, C), panels)`` sorted by
    ``Panel.index``. Missing indices are allowed (a subset of the story). Raises NodeInputError for a batch
    whose size differs from its story's panel count, a panel index that appears twice, images of different
    sizes (both sizes named), or no panels at all.
    """
    seen: dict[int, str] = {}
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
            if panel.index in seen:
                raise NodeInputError(node, name, "each panel once", got=(
                    f"panel {panel.index + 1} (story line {panel.line}) in both {seen[panel.index]} and {name}"))
            seen[panel.index] = name
            items.append((panel.index, images[i], panel))
    if not items:
        raise NodeInputError(node, "images", "at least one panel image")
    items.sort(key=lambda t: t[0])
    device = items[0][1].device
    return torch.stack([t[1].to(device) for t in items]), tuple(t[2] for t in items)
