"""Template-browser thumbnails: ``workflows/<name>.jpg`` for every shipped ``workflows/<name>.json``.

ComfyUI's template browser shows a custom node pack's example workflow with the JPEG of the same name beside it
(frontend: ``/api/workflow_templates/<pack>/<name>.jpg``). Each thumbnail is drawn from real photos (scikit-image's
sample images, all public domain or CC0: see PHOTOS) by the pack's own comic layout (story/layout.py), never from
model outputs, and says what its workflow makes, read from the workflow itself:

* a workflow with ``SDN_ComicLayout``: its comic pages, in the node's layout settings (layout, reading direction,
  page aspect, rows, columns, gutter, border, colours) scaled to the thumbnail, captions from its
  ``SDN_StoryPrompt`` story; where the story is connected to the layout node, its dialogue (``>`` lines) drawn as
  bubbles by the node's own code (story/bubbles.py ``compose_comic``, in Pillow's font as on a machine without a
  comic font); a story longer than a page shows its first two pages side by side where they are portrait (else its
  first page); with ``LoadImage`` and ``PhotoMakerEncode``, the reference photo to the left;
* a workflow with ``SDN_TransitionEmbeds``: a film strip of cross-fading frames between its keyframes (the
  story's panels above it when it has a story), ``frames_per_transition`` from that node;
* its model family (from the file name: sd15, sdxl, flux, qwen_image) in a badge.

A story's first character is the astronaut photo and its second the cameraman (different crops per panel, both
side by side where a panel names both); panels without a character get a scene photo chosen by words of their
prompt (lighthouse -> the rocket at dusk, cafe -> the coffee cup...). Drawing is deterministic; the recipe (what
was drawn, as JSON) is kept in the JPEG's comment, so ``--check`` knows a thumbnail whose workflow changed
exactly, and compares pixels with a tolerance for the drawing itself (fonts and Pillow versions differ).

Usage: python scripts/make_thumbnails.py [NAME ...] [--check] [--overwrite] [--workflows DIR]
Without ``--overwrite`` an existing thumbnail is never replaced: one that differs from what would be drawn is
named and the script exits with code 2. ``--check`` writes nothing and exits with 1 when a thumbnail is
missing, stale, or has no workflow. Needs Pillow, numpy, torch and scikit-image (not ComfyUI).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pack_modules import PACK, pack_module

bubbles = pack_module("story.bubbles")
layout = pack_module("story.layout")
parser = pack_module("story.parser")

LONG_SIDE = 512  # px, like other packs' template thumbnails
QUALITY = 85
MAX_BYTES = 80_000
MIN_CAPTION = 10  # px: smaller captions are unreadable at thumbnail size
# A story longer than a page shows its first two pages side by side where they make a thumbnail at most this
# much wider than tall (portrait pages), else its first page (two square pages would be too small to read).
TWO_PAGES_ASPECT = 1.5
FILM_FRAMES = 8  # frames shown of a transition video (two rows of four)
PAGE_GAP = 12  # px between the pieces of a thumbnail (pages, the reference photo)
REFERENCE_SIDE = LONG_SIDE * 3 // 10  # px, the reference photo beside a PhotoMaker workflow's page
DARK = "#101010"

# scikit-image sample images used, with the licence their skimage.data docstring states.
PHOTOS = {
    "astronaut": "Eileen Collins, NASA: public domain",
    "camera": "Lav Varshney: CC0",
    "chelsea": "Stefan van der Walt: CC0",
    "coffee": "Rachel Michetti: CC0",
    "rocket": "SpaceX: public domain",
    "hubble_deep_field": "NASA: public domain",
}
# A story's characters in order; crops as (x0, y0, x1, y1) fractions of the photo, subject near the centre, used
# in turn by the character's panels: face, half body, wider, whole photo.
CHARACTERS = (
    ("astronaut", ((0.22, 0.0, 0.68, 0.46), (0.05, 0.0, 0.8, 0.75), (0.3, 0.0, 0.95, 0.65), (0.0, 0.0, 1.0, 1.0))),
    ("camera", ((0.22, 0.06, 0.68, 0.52), (0.05, 0.0, 0.8, 0.75), (0.1, 0.0, 0.9, 0.8), (0.0, 0.0, 1.0, 1.0))),
)
WHOLE = (0.0, 0.0, 1.0, 1.0)
# Scene photos for panels without a character: the first whose words occur in the panel's prompt, else in turn.
SCENES = (
    ("rocket", ("lighthouse", "tower", "lamp", "beam")),
    ("coffee", ("coffee", "cafe", "cup")),
    ("hubble_deep_field", ("night", "stars", "sky", "space")),
    ("chelsea", ("cat", "harbour", "village", "home")),
)
BADGES = (("qwen", "Qwen-Image"), ("flux", "Flux.1"), ("sdxl", "SDXL"), ("sd15", "SD1.5"))


class RecipeError(ValueError):
    """A workflow this script cannot draw a thumbnail for (the message names it and why)."""


def _nodes(workflow: dict, node_type: str) -> list[dict]:
    return [n for n in workflow.get("nodes", []) if n.get("type") == node_type]


def _badge(name: str) -> str:
    tokens = name.split("_")
    return next((label for token, label in BADGES if token in tokens), "")


def _story(workflow: dict, name: str):
    prompts = _nodes(workflow, "SDN_StoryPrompt")
    if not prompts:
        return None
    if len(prompts) > 1:
        raise RecipeError(f"{name}: {len(prompts)} SDN_StoryPrompt nodes; a thumbnail draws one story")
    return parser.parse_story(prompts[0]["widgets_values"][0])


def _panels(story) -> list[dict]:
    """Per panel: its photo shots ``[[photo, crop], ...]`` (one per character, or a scene) and its caption."""
    characters = {c: CHARACTERS[i % len(CHARACTERS)] for i, c in enumerate(story.character_names)}
    seen = {c: 0 for c in characters}
    scene_turn = 0
    panels = []
    for panel in story.panels:
        shots = []
        for c in panel.characters:
            photo, crops = characters[c]
            shots.append([photo, list(crops[seen[c] % len(crops)] if len(panel.characters) == 1 else crops[1])])
            seen[c] += 1
        if not shots:
            words = set(re.findall(r"\w+", panel.prompt.lower()))
            scene = next((s for s, keys in SCENES if words.intersection(keys)), None)
            if scene is None:
                scene = SCENES[scene_turn % len(SCENES)][0]
                scene_turn += 1
            shots.append([scene, list(WHOLE)])
        panels.append({"shots": shots, "caption": panel.caption})
    return panels


def _scaled(spec: dict, scale: float) -> dict:
    """``spec`` (LayoutSpec fields) for pages ``scale`` times the size; lines stay at least 1 px where drawn."""
    out = dict(spec, page_width=round(spec["page_width"] * scale), page_height=round(spec["page_height"] * scale),
               caption_font_size=max(MIN_CAPTION, round(spec["caption_font_size"] * scale)), font_path="")
    for key in ("gutter", "border_width"):
        out[key] = max(1, round(spec[key] * scale)) if spec[key] else 0
    return out


def _comic_recipe(workflow: dict, name: str, node: dict) -> dict:
    story = _story(workflow, name)
    if story is None:
        raise RecipeError(f"{name}: SDN_ComicLayout without an SDN_StoryPrompt to take the panels from")
    # SDN_ComicLayout's widgets come in the order of LayoutSpec's fields (the node passes them on by name).
    spec = dict(zip((f.name for f in dataclasses.fields(layout.LayoutSpec)), node["widgets_values"]))
    spec["font_path"] = ""
    panels = _panels(story)
    cells = len(layout.cell_boxes(layout.LayoutSpec(**spec)))
    two = len(panels) > cells and 2 * spec["page_width"] <= TWO_PAGES_ASPECT * spec["page_height"]
    pages = 2 if two else 1
    panels = panels[:pages * cells]
    if any(i.get("name") == "story" and i.get("link") is not None for i in node.get("inputs", [])):
        for out, panel in zip(panels, story.panels):  # what SDN_ComicLayout draws bubbles from
            out.update(characters=list(panel.characters), dialogue=[dataclasses.asdict(d) for d in panel.dialogue])
    photo = bool(_nodes(workflow, "PhotoMakerEncode") and _nodes(workflow, "LoadImage"))
    width = LONG_SIDE - (REFERENCE_SIDE + PAGE_GAP if photo else 0)
    scale = min((width - (pages - 1) * PAGE_GAP) / (pages * spec["page_width"]), LONG_SIDE / spec["page_height"])
    recipe = {"kind": "comic", "spec": _scaled(spec, scale), "panels": panels}
    if photo:
        names = story.character_names
        recipe["reference"] = {"shots": [[CHARACTERS[0][0], list(WHOLE)]],
                               "caption": f"Photo of {names[0]}" if names else "Photo"}
    return recipe


def _video_recipe(workflow: dict, name: str, node: dict) -> dict:
    story = _story(workflow, name)
    if story is not None:
        keyframes = _panels(story)
    else:  # keyframes loaded from files: one character, two of its crops
        photo, crops = CHARACTERS[0]
        keyframes = [{"shots": [[photo, list(crops[i])]], "caption": ""} for i in (0, 3)]
    if len(keyframes) < 2:
        raise RecipeError(f"{name}: a transition needs at least 2 keyframes, the story has {len(keyframes)}")
    return {"kind": "video", "keyframes": keyframes, "frames_per_transition": int(node["widgets_values"][0]),
            "story": story is not None}


def recipe(workflow: dict, name: str) -> dict:
    """What the thumbnail of ``workflow`` (UI-format JSON, file stem ``name``) shows, as plain JSON data.

    RecipeError when the workflow has neither SDN_ComicLayout nor SDN_TransitionEmbeds, or they lack their story
    or keyframes. parser.parse_story's NodeInputError for a malformed story.
    """
    if _nodes(workflow, "SDN_TransitionEmbeds"):
        out = _video_recipe(workflow, name, _nodes(workflow, "SDN_TransitionEmbeds")[0])
    elif _nodes(workflow, "SDN_ComicLayout"):
        out = _comic_recipe(workflow, name, _nodes(workflow, "SDN_ComicLayout")[0])
    else:
        raise RecipeError(f"{name}: no SDN_ComicLayout or SDN_TransitionEmbeds node to draw a thumbnail of")
    return {"workflow": f"{name}.json", "badge": _badge(name), **out}


# ---- drawing -----------------------------------------------------------------------------------------------

def _photo(name: str) -> Image.Image:
    import skimage.data

    if name not in PHOTOS:
        raise RecipeError(f"photo {name!r} is not one of the public-domain/CC0 photos {sorted(PHOTOS)}")
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _shot(photo: str, crop, size: tuple[int, int]) -> Image.Image:
    img = _photo(photo)
    w, h = img.size
    box = (round(crop[0] * w), round(crop[1] * h), round(crop[2] * w), round(crop[3] * h))
    return ImageOps.fit(img.crop(box), size, Image.Resampling.LANCZOS)


def _panel_image(panel: dict, size: int) -> Image.Image:
    """One panel's picture, ``size`` x ``size``: its shots side by side (characters sharing a panel)."""
    shots = panel["shots"]
    img = Image.new("RGB", (size, size))
    for i, (photo, crop) in enumerate(shots):
        x0, x1 = size * i // len(shots), size * (i + 1) // len(shots)
        img.paste(_shot(photo, crop, (x1 - x0, size)), (x0, 0))
    return img


def _batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> IMAGE (B, H, W, 3) float 0..1, what compose_pages takes."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def _pil(page: torch.Tensor) -> Image.Image:
    return Image.fromarray((page.numpy() * 255.0 + 0.5).astype(np.uint8))


def _layout_story(panels: list[dict]):
    """The parser Story SDN_ComicLayout gets for ``panels`` (recipe panels with ``characters`` and ``dialogue``):
    their captions, characters and dialogue lines; prompts are not drawn, so left empty."""
    return parser.Story(
        characters=dict.fromkeys((c for p in panels for c in p["characters"]), ""),
        panels=tuple(parser.Panel(index=k, line=0, prompt="", caption=p["caption"], characters=tuple(p["characters"]),
                                  no_character=not p["characters"], source="",
                                  dialogue=tuple(parser.DialogueLine(**d) for d in p["dialogue"]))
                     for k, p in enumerate(panels)))


def _pages(panels: list[dict], spec: dict) -> list[Image.Image]:
    """The pages SDN_ComicLayout draws of ``panels``' pictures: with the story (its captions and bubbles) where
    the recipe panels carry its dialogue, else with their captions."""
    size = max(spec["page_width"], spec["page_height"])
    images = _batch([_panel_image(p, size) for p in panels])
    story = _layout_story(panels) if "dialogue" in panels[0] else None
    captions = None if story else [p["caption"] for p in panels]
    # without comic fonts: bubbles lettered in Pillow's font, like the captions, whatever fonts are installed
    pages = bubbles.compose_comic(images, layout.LayoutSpec(**spec), captions, story, comic=False)[0]
    return [_pil(p) for p in pages]


def _row(parts: list[Image.Image], gap: int, background) -> Image.Image:
    """Images left to right, ``gap`` px apart, centred vertically."""
    h = max(p.height for p in parts)
    out = Image.new("RGB", (sum(p.width for p in parts) + gap * (len(parts) - 1), h), background)
    x = 0
    for p in parts:
        out.paste(p, (x, (h - p.height) // 2))
        x += p.width + gap
    return out


def _column(parts: list[Image.Image], background) -> Image.Image:
    w = max(p.width for p in parts)
    out = Image.new("RGB", (w, sum(p.height for p in parts)), background)
    y = 0
    for p in parts:
        out.paste(p, ((w - p.width) // 2, y))
        y += p.height
    return out


def _arrow(width: int, height: int, background) -> Image.Image:
    img = Image.new("RGB", (width, height), background)
    cx, cy, r = width // 2, height // 2, max(3, width // 3)
    ImageDraw.Draw(img).polygon([(cx - r, cy - r), (cx + r, cy), (cx - r, cy + r)], fill="#404040")
    return img


def _draw_comic(r: dict) -> Image.Image:
    spec = r["spec"]
    pages = _pages(r["panels"], spec)
    out = _row(pages, PAGE_GAP, "#d8d8d8") if len(pages) > 1 else pages[0]
    if "reference" in r:
        side, bg = REFERENCE_SIDE, spec["background_color"]
        photo = _pages([r["reference"]], dict(spec, layout="grid", rows=1, columns=1, page_width=side,
                                               page_height=side))[0]
        out = _row([photo, _arrow(PAGE_GAP, side, bg), out], 0, bg)
    return out


def _film(frames: list[Image.Image], captions: list[str], columns: int) -> Image.Image:
    """Rows of ``columns`` frames on dark film with sprocket holes in the margins above and below each row."""
    gutter = 10
    cell = (LONG_SIDE - gutter * (columns + 1)) // columns
    spec = layout.LayoutSpec(layout="strip", columns=columns, page_width=LONG_SIDE, page_height=cell + 2 * gutter,
                             gutter=gutter, border_width=0, background_color=DARK, caption_font_size=MIN_CAPTION + 1)
    rows = [_pil(p) for p in layout.compose_pages(_batch(frames), spec, captions)]
    for row in rows:
        draw = ImageDraw.Draw(row)
        for x in range(4, row.width - 8, 14):
            for y in (gutter // 2 - 2, row.height - gutter // 2 - 2):
                draw.rectangle((x, y, x + 7, y + 4), fill="#d0d0d0")
    return _column(rows, DARK)


def _draw_video(r: dict) -> Image.Image:
    columns = FILM_FRAMES // 2
    size = (LONG_SIDE - 10 * (columns + 1)) // columns
    keys = [np.asarray(_panel_image(k, size), dtype=np.float32) for k in r["keyframes"]]
    span = r["frames_per_transition"] - 1
    total = (len(keys) - 1) * span + 1
    shown = [round(j * (total - 1) / (FILM_FRAMES - 1)) for j in range(FILM_FRAMES)]
    frames = []
    for f in shown:
        k = min(f // span, len(keys) - 2)  # frame f lies between keyframes k and k + 1
        t = f / span - k
        frames.append(Image.fromarray(((1 - t) * keys[k] + t * keys[k + 1] + 0.5).astype(np.uint8)))
    film = _film(frames, [f"frame {f + 1}" for f in shown], columns)
    if not r["story"]:
        return film
    strip = layout.LayoutSpec(layout="strip", columns=len(keys), page_width=LONG_SIDE,
                              page_height=(LONG_SIDE - 8 * (len(keys) + 1)) // len(keys) + 16, gutter=8,
                              border_width=2, caption_font_size=MIN_CAPTION + 1)
    top = _pil(layout.compose_pages(_batch([_panel_image(k, LONG_SIDE) for k in r["keyframes"]]), strip,
                                    [k["caption"] for k in r["keyframes"]])[0])
    return _column([top, film], DARK)


def _draw_badge(img: Image.Image, text: str) -> None:
    if not text:
        return
    font = ImageFont.load_default(size=13)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h, pad = x1 - x0, y1 - y0, 5
    box = (img.width - w - 3 * pad, pad, img.width - pad, pad + h + 2 * pad)
    draw.rounded_rectangle(box, radius=4, fill="#202020")
    draw.text((box[0] + pad - x0, box[1] + pad - y0), text, font=font, fill="#ffffff")


def draw(r: dict) -> Image.Image:
    """The thumbnail of a ``recipe``: RGB, at most LONG_SIDE px on its long side."""
    img = _draw_video(r) if r["kind"] == "video" else _draw_comic(r)
    _draw_badge(img, r["badge"])
    if max(img.size) > LONG_SIDE:
        raise AssertionError(f"{r['workflow']}: thumbnail {img.size} exceeds {LONG_SIDE} px")
    return img


def thumbnail(workflow_path: Path) -> tuple[Image.Image, str]:
    """(image, recipe JSON) of the thumbnail of the workflow file ``workflow_path``."""
    r = recipe(json.loads(workflow_path.read_text(encoding="utf-8")), workflow_path.stem)
    return draw(r), json.dumps(r, sort_keys=True, ensure_ascii=False)


def encode(img: Image.Image, comment: str) -> bytes:
    """JPEG bytes (quality QUALITY) with ``comment`` (the recipe) in its COM segment."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY, optimize=True, comment=comment.encode("utf-8"))
    return buf.getvalue()


def difference(a: Image.Image, b: Image.Image) -> float:
    """Largest mean absolute difference (0..1) over 32 x 32 px tiles of two images of one size, compared at a
    quarter of their size: a moved panel, another photo or a missing caption box moves a tile by far more than
    JPEG noise or another font's glyph shapes do."""
    if a.size != b.size:
        return 1.0
    small = (max(1, a.width // 4), max(1, a.height // 4))
    x, y = (np.asarray(i.convert("RGB").resize(small, Image.Resampling.BOX), dtype=np.float32) / 255.0 for i in (a, b))
    d = np.abs(x - y).mean(axis=2)
    th, tw = math.ceil(d.shape[0] / 8), math.ceil(d.shape[1] / 8)
    d = np.pad(d, ((0, th * 8 - d.shape[0]), (0, tw * 8 - d.shape[1])), constant_values=np.nan)
    return float(np.nanmax(np.nanmean(d.reshape(th, 8, tw, 8), axis=(1, 3))))


TOLERANCE = 0.11  # other fonts: <= 0.09; a photo, caption box, badge or panel order changed: >= 0.14


def stale(path: Path, img: Image.Image, comment: str) -> str | None:
    """Why the thumbnail file ``path`` is not what ``(img, comment)`` would give, or None when it is."""
    if not path.exists():
        return "missing"
    with Image.open(path) as old:
        old.load()
        if old.format != "JPEG":
            return f"not a JPEG ({old.format})"
        if old.info.get("comment", b"").decode("utf-8", "replace") != comment:
            return "drawn from other workflow settings (its recipe differs)"
        diff = difference(old, img)
    if diff > TOLERANCE:
        return f"drawn differently (a tile differs by {diff:.3f} > {TOLERANCE})"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="workflow names (file stems); default: every workflow")
    ap.add_argument("--workflows", type=Path, default=PACK / "workflows", help="folder of the workflows")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a thumbnail is missing, stale "
                    "or has no workflow")
    ap.add_argument("--overwrite", action="store_true", help="replace existing thumbnails that are not byte-identical to a fresh drawing")
    args = ap.parse_args(argv)
    folder = args.workflows
    workflows = sorted(folder.glob("*.json"))
    if args.names:
        wanted = set(args.names)
        workflows = [w for w in workflows if w.stem in wanted]
        unknown = wanted - {w.stem for w in workflows}
        if unknown:
            ap.error(f"no workflow {', '.join(sorted(unknown))} in {folder}")
    problems, kept = [], []
    for wf in workflows:
        path = wf.with_suffix(".jpg")
        try:
            img, comment = thumbnail(wf)
        except (RecipeError, layout.NodeInputError) as exc:
            problems.append(f"{wf.name}: {exc}")
            continue
        data = encode(img, comment)
        if path.exists() and path.read_bytes() == data:
            print(f"up to date  {path.name}")
            continue
        why = stale(path, img, comment)
        if why is None and (args.check or not args.overwrite):
            print(f"up to date  {path.name} (within the tolerance)")
        elif args.check:
            problems.append(f"{path.name}: {why}")
        elif why != "missing" and not args.overwrite:
            kept.append(f"{path.name}: {why}")
        elif len(data) > MAX_BYTES:
            problems.append(f"{path.name}: {len(data)} bytes > {MAX_BYTES}")
        else:
            path.write_bytes(data)
            print(f"wrote       {path.name} ({img.width} x {img.height}, {len(data) // 1024} KB)")
    if not args.names:
        problems += [f"{j.name}: no workflow {j.stem}.json" for j in sorted(folder.glob("*.jpg"))
                     if not j.with_suffix(".json").exists()]
    for line in problems:
        print(f"problem     {line}", file=sys.stderr)
    for line in kept:
        print(f"kept        {line}; not replaced (use --overwrite)", file=sys.stderr)
    return 1 if problems else 2 if kept else 0


if __name__ == "__main__":
    sys.exit(main())
