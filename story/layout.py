"""Comic pages from a batch of panel images (Pillow drawing, torch in and out).

Layouts (cells are filled in reading order: rows top to bottom, within a row left to right, or right to left
for ``reading_direction="right-to-left"``, which mirrors the ORDER of panels, never their pixels):

* ``grid``: ``rows`` x ``columns`` equal cells per page.
* ``four panel``: 2 x 2 (the reference app's layout).
* ``classic``: ``rows`` rows of equal height per page; row r holds 1, 2, 3, 1, 2, 3... panels (r = 0, 1, 2...),
  so a 3-row page holds 6 panels: one wide establishing panel, two halves, three thirds.
* ``strip``: one row of ``columns`` panels per page (a horizontal strip; pick a wide page).

Geometry: a gutter of ``gutter`` px surrounds every cell (page margins included); cell sizes are integer
splits of what is left. A border of ``border_width`` px is drawn inside each cell edge and the panel fills the
rest. Panels keep their aspect by CENTER-CROP (cover) to the cell, then Lanczos resize: cells are always fully
filled, as in printed comics; edges of panels whose aspect differs from the cell are cut.
Captions: drawn in a translucent white box across the panel bottom, black text, wrapped at word boundaries
(a word wider than the panel is broken by characters); the font shrinks down to 6 px if the wrapped text would
take more than half of the panel, and lines that still do not fit are dropped with "..." so text never leaves
the panel. Cells with no panel on the last page are left as background.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont

from ..errors import NodeInputError

NODE_ID = "SDN_ComicLayout"
LAYOUTS = ("grid", "four panel", "classic", "strip")
DIRECTIONS = ("left-to-right", "right-to-left")
CLASSIC_PATTERN = (1, 2, 3)
MIN_FONT = 6


@dataclass(frozen=True)
class LayoutSpec:
    """Page geometry. Sizes in pixels; colors as Pillow color strings (``"#RRGGBB"``, ``"white"``...)."""

    layout: str = "classic"
    reading_direction: str = "left-to-right"
    page_width: int = 1024
    page_height: int = 1448
    rows: int = 3
    columns: int = 2
    gutter: int = 16
    border_width: int = 4
    border_color: str = "#000000"
    background_color: str = "#FFFFFF"
    caption_font_size: int = 24
    font_path: str = ""


def _fail(name: str, expected: str, got) -> NodeInputError:
    return NodeInputError(NODE_ID, name, expected, got=repr(got))


def _color(spec: LayoutSpec, name: str) -> tuple[int, int, int]:
    value = getattr(spec, name)
    try:
        return ImageColor.getrgb(value.strip())[:3]
    except (ValueError, AttributeError):
        raise _fail(name, "a color such as '#1a1a1a', '#fff' or 'white'", value) from None


def row_counts(spec: LayoutSpec) -> list[int]:
    """Number of cells in each row of one page, top to bottom."""
    if spec.layout == "grid":
        return [spec.columns] * spec.rows
    if spec.layout == "four panel":
        return [2, 2]
    if spec.layout == "classic":
        return [CLASSIC_PATTERN[r % len(CLASSIC_PATTERN)] for r in range(spec.rows)]
    if spec.layout == "strip":
        return [spec.columns]
    raise _fail("layout", f"one of {', '.join(LAYOUTS)}", spec.layout)


def _split(total: int, n: int, gutter: int) -> list[tuple[int, int]]:
    """(start, size) of n cells across ``total`` px with ``gutter`` px between and around them."""
    free = total - gutter * (n + 1)
    starts, pos = [], gutter
    for i in range(n):
        size = free * (i + 1) // n - free * i // n
        starts.append((pos, size))
        pos += size + gutter
    return starts


def cell_boxes(spec: LayoutSpec) -> list[tuple[int, int, int, int]]:
    """Cell rectangles ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of one page in READING order."""
    counts = row_counts(spec)
    boxes = []
    for (y, h), n in zip(_split(spec.page_height, len(counts), spec.gutter), counts):
        row = [(x, y, x + w, y + h) for x, w in _split(spec.page_width, n, spec.gutter)]
        if spec.reading_direction == "right-to-left":
            row.reverse()
        boxes.extend(row)
    return boxes


def validate(spec: LayoutSpec) -> None:
    """Raise NodeInputError for unusable settings (cells that would be smaller than the border, bad names)."""
    if spec.layout not in LAYOUTS:
        raise _fail("layout", f"one of {', '.join(LAYOUTS)}", spec.layout)
    if spec.reading_direction not in DIRECTIONS:
        raise _fail("reading_direction", f"one of {', '.join(DIRECTIONS)}", spec.reading_direction)
    for name in ("rows", "columns"):
        if getattr(spec, name) < 1:
            raise _fail(name, "at least 1", getattr(spec, name))
    for name in ("gutter", "border_width"):
        if getattr(spec, name) < 0:
            raise _fail(name, "0 or more pixels", getattr(spec, name))
    counts = row_counts(spec)
    min_w = min(w for _, w in _split(spec.page_width, max(counts), spec.gutter))
    min_h = min(h for _, h in _split(spec.page_height, len(counts), spec.gutter))
    if min(min_w, min_h) <= 2 * spec.border_width:
        raise _fail("page_width" if min_w <= min_h else "page_height",
                    f"a page large enough for {len(counts)} rows of up to {max(counts)} cells with gutter "
                    f"{spec.gutter} and border {spec.border_width} px", spec.page_width if min_w <= min_h else spec.page_height)
    _color(spec, "border_color")
    _color(spec, "background_color")


def load_font(font_path: str, size: int):
    """A scalable font: ``font_path`` (TrueType/OpenType) or, when empty, Pillow's built-in scalable default."""
    size = max(int(size), 1)
    if not font_path or not font_path.strip():
        return ImageFont.load_default(size=size)
    path = os.path.expanduser(font_path.strip())
    try:
        return ImageFont.truetype(path, size=size)
    except (OSError, ValueError) as exc:
        raise NodeInputError(NODE_ID, "font_path", "a readable TrueType/OpenType font file, or empty for "
                             "Pillow's default font", got=f"'{font_path}' ({exc})") from None


def _wrap(text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        # start a new line; break a word that alone is wider than the panel
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def layout_caption(text: str, box_w: int, box_h: int, spec: LayoutSpec):
    """Fit ``text`` into a panel of ``box_w`` x ``box_h`` px.

    Returns ``(font, lines, line_height, pad)``; the caption block (lines plus padding) is at most half the
    panel tall and every line at most ``box_w - 2 * pad`` wide. Empty ``lines`` when nothing fits.
    """
    size = spec.caption_font_size
    while True:
        font = load_font(spec.font_path, size)
        pad = max(2, size // 4)
        ascent, descent = font.getmetrics()
        line_h = ascent + descent + max(1, size // 8)
        lines = _wrap(text, font, max(box_w - 2 * pad, 1))
        limit = box_h // 2
        if len(lines) * line_h + 2 * pad <= limit or size <= MIN_FONT:
            break
        size = max(MIN_FONT, int(size * 0.85))
    max_lines = max((limit - 2 * pad) // line_h, 0)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        if lines:
            last = lines[-1] + "..."
            while font.getlength(last) > box_w - 2 * pad and len(last) > 3:
                last = last[:-4] + "..."
            lines[-1] = last
    if any(font.getlength(l) > box_w - 2 * pad for l in lines):
        lines = []
    return font, lines, line_h, pad


def _draw_caption(page: Image.Image, box: tuple[int, int, int, int], text: str, spec: LayoutSpec) -> None:
    x0, y0, x1, y1 = box
    font, lines, line_h, pad = layout_caption(text, x1 - x0, y1 - y0, spec)
    if not lines:
        return
    top = y1 - (len(lines) * line_h + 2 * pad)
    overlay = Image.new("RGBA", (x1 - x0, y1 - top), (255, 255, 255, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, 0, overlay.width, overlay.height), fill=(255, 255, 255, 190))
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_h), line, font=font, fill=(0, 0, 0, 255))
    region = page.crop((x0, top, x1, y1)).convert("RGBA")
    page.paste(Image.alpha_composite(region, overlay).convert("RGB"), (x0, top))


def _fit(panel: np.ndarray, w: int, h: int) -> Image.Image:
    """Center-crop ``panel`` (H, W, 3 uint8) to the aspect w:h, then resize to w x h."""
    img = Image.fromarray(panel)
    sw, sh = img.size
    if sw * h > sh * w:  # too wide: crop the sides
        cw = max(1, round(sh * w / h))
        left = (sw - cw) // 2
        img = img.crop((left, 0, left + cw, sh))
    else:
        ch = max(1, round(sw * h / w))
        top = (sh - ch) // 2
        img = img.crop((0, top, sw, top + ch))
    return img.resize((w, h), Image.Resampling.LANCZOS) if img.size != (w, h) else img


def panel_box(cell: tuple[int, int, int, int], border: int) -> tuple[int, int, int, int]:
    """The area inside a cell's border where the panel image goes."""
    x0, y0, x1, y1 = cell
    return x0 + border, y0 + border, x1 - border, y1 - border


def compose_pages(images: torch.Tensor, spec: LayoutSpec, captions: list[str] | None = None) -> torch.Tensor:
    """Lay panels out on pages.

    images: IMAGE ``(B, H, W, C)`` float in 0..1 (C = 1, 3 or 4; alpha dropped, gray repeated), B >= 1.
    captions: per panel (``""`` or missing = none); at most B entries.
    Returns IMAGE ``(pages, page_height, page_width, 3)`` float32 0..1 on the CPU,
    pages = ceil(B / cells per page). NodeInputError for bad settings, fonts, colors or caption count.
    """
    validate(spec)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] not in (1, 3, 4):
        raise NodeInputError(NODE_ID, "images", "an IMAGE batch (B, H, W, C) with C in 1, 3, 4",
                             got=str(tuple(images.shape)) if isinstance(images, torch.Tensor) else type(images).__name__)
    captions = list(captions or [])
    if len(captions) > images.shape[0]:
        raise NodeInputError(NODE_ID, "captions", f"at most one line per panel ({images.shape[0]} panels)",
                             got=f"{len(captions)} lines")
    if any(c.strip() for c in captions):
        load_font(spec.font_path, spec.caption_font_size)  # fail early on a bad font path
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    cells = cell_boxes(spec)
    bg, bc = _color(spec, "background_color"), _color(spec, "border_color")
    pages = []
    for start in range(0, arr.shape[0], len(cells)):
        page = Image.new("RGB", (spec.page_width, spec.page_height), bg)
        draw = ImageDraw.Draw(page)
        for k, cell in enumerate(cells):
            i = start + k
            if i >= arr.shape[0]:
                break
            if spec.border_width:
                draw.rectangle((cell[0], cell[1], cell[2] - 1, cell[3] - 1), fill=bc)
            box = panel_box(cell, spec.border_width)
            page.paste(_fit(arr[i], box[2] - box[0], box[3] - box[1]), box[:2])
            if i < len(captions) and captions[i].strip():
                _draw_caption(page, box, captions[i].strip(), spec)
        pages.append(torch.from_numpy(np.asarray(page, dtype=np.float32) / 255.0))
    return torch.stack(pages)


def split_captions(text: str) -> list[str]:
    """One caption per line (as SDN_StoryPrompt's ``captions`` output); a single trailing newline is ignored."""
    if not text:
        return []
    lines = text.split("\n")
    if lines and lines[-1] == "" and len(lines) > 1:
        lines = lines[:-1]
    return [l.rstrip("\r") for l in lines]
