"""Dialogue on comic pages: speech, thought, shout and whisper bubbles and narration boxes (issue 11).

Pillow and numpy only; SDN_ComicLayout draws them through ``compose_pages``' per-panel hook. Fonts, line
breaking and any-script text are layout.py's (``CaptionFonts`` preferring an installed comic font, ``wrap``,
``truncate``): a bubble is drawn in a font that has all its characters, right-to-left text is shaped by raqm.

Shapes, one outline around body and tail:

* speech: an ellipse with a tapered tail;
* thought: a cloud (circles along an ellipse) with three shrinking circles trailing toward the speaker;
* shout: a spiky star around the ellipse, with the tail;
* whisper: the speech shape with a dashed outline;
* narration (a ``>`` line without speaker): a pale yellow box, no tail.

Text is wrapped into balanced lines making a block about 2.5 times as wide as tall (at most what the panel
allows) and centred; the ellipse passes through the corners of the text block padded by a third of the font size
plus the outline width (semi-axes sqrt(2) x its half sizes), so the text and its padding lie inside the outline.

Placement, per panel, inside the panel (a margin off its border) and above its caption box, in dialogue order:
each bubble takes the first free position in reading order, top-most first, then left-most (right-most on
right-to-left pages), either beside the previous bubble (after it in the reading direction, its top not above
the previous top) or below it, never closer than a gap to another bubble. With character masks, positions
covering any character of the panel (mask >= 0.5 after the panel's own centre crop) lose to positions covering
less; without masks the top-most positions win (bubbles fill the top band). When a panel's bubbles do not all fit,
the font shrinks in 0.85x steps from ``caption_font_size`` down to ``MIN_FONT``; the ones that still do not fit
are drawn where they cover the least (text cut with "...", maybe over another bubble) and reported: ``overflow``
in the layout and a warning naming the panel.

Tails end at the speaker: on its mask region, a font size beyond the region's pixel nearest to the bubble's
centre (when the region reaches that far); without a mask (or an
empty one) below the bubble, at the speaker's place among the panel's characters (the first named on the
reading-start side); a speaker the panel does not name (an off-panel voice) points to the nearer side edge.
"""
from __future__ import annotations

import json
import logging
import math
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import NodeInputError
from .layout import (MIN_FONT, NODE_ID, CaptionFonts, LayoutSpec, _longest, compose_pages, direction_of, fit_cover,
                     truncate, wrap)
from .parser import NARRATION

SHRINK = 0.85
GRID = 160  # placement cells across the larger side of a panel
MASK_THRESHOLD = 0.5
ASPECT = 2.5  # preferred text block width / height
TAIL_HALF_ANGLE = 0.22  # radians of the body's outline the tail replaces on each side
FILL, INK, NARRATION_FILL = (255, 255, 255, 255), (0, 0, 0, 255), (255, 244, 186, 255)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bubble:
    """One drawn bubble, as the layout output lists it. Coordinates are page pixels, boxes ``(x0, y0, x1, y1)``
    with x1, y1 exclusive; ``page`` and ``panel`` are 0-based (panel = story panel index), ``line`` the dialogue
    line's 1-based story line. ``box``: the body (outline, spikes and cloud bumps included; tails and trailing
    circles reach out of it), None when the panel is too small to draw it at all. ``text_box``: the padded text
    block, inside the body's shape. ``tail``: the tail's tip (thought: the last trailing circle's centre), None
    for narration. ``lines``: the text as drawn, each line centred on the text box, ``line_height`` px apart,
    from ``text_box``'s centre minus half their height (Pillow anchor "ma"). ``overflow``: did not fit (shrunk to
    MIN_FONT and then cut, moved out of reading order, over another bubble, or not drawn)."""

    page: int
    panel: int
    line: int
    kind: str
    speaker: str | None
    text: str
    box: tuple | None
    text_box: tuple | None
    tail: tuple | None
    font_size: int
    lines: tuple
    line_height: int
    overflow: bool


@dataclass(frozen=True)
class _Sized:
    """A dialogue line measured at one font size: outer size ``w`` x ``h``, text block ``tw`` x ``th``."""

    font: object
    direction: str | None
    lines: list
    line_h: int
    pad: int
    lw: int
    ext: int
    tw: int
    th: int
    w: int
    h: int
    cut: bool


def _measure(item, fonts: CaptionFonts, size: int, max_w: int, max_h: int, may_cut: bool) -> _Sized | None:
    """``item`` (a DialogueLine) at ``size`` px, at most ``max_w`` x ``max_h`` outside; None when it does not fit
    (with ``may_cut``: only when not even one line fits)."""
    font = fonts.font(fonts.face_for(item.text), size)
    direction = direction_of(font, item.text)
    measure = lambda s: font.getlength(s, direction=direction)  # noqa: E731
    ascent, descent = font.getmetrics()
    line_h, pad, lw = ascent + descent + max(1, size // 8), max(2, size // 3), max(1, round(size / 10))
    ext = 0 if item.kind in (NARRATION, "speech", "whisper") else round(0.6 * size)  # spikes, cloud bumps
    # a box around the padded block, or an ellipse through the corners of the block padded by pad + lw (the
    # outline's inner half stays off the text box), plus spikes or bumps and the outline's outer half
    k, core = (1.0, 0) if item.kind == NARRATION else (math.sqrt(2), 2 * lw)
    inner = 2 * pad + 2 * lw
    width = int((max_w - 2 * ext - core) / k) - inner
    max_lines = (int((max_h - 2 * ext - core) / k) - inner) // line_h
    if width < size or max_lines < 1:
        return None
    text = item.text
    if measure(text) > (max_lines + 1) * width:  # more than can show: wrap no more than that (hostile lengths)
        if not may_cut:
            return None
        text = text[:_longest(lambda n: measure(text[:n]) <= (max_lines + 1) * width, 1, len(text))]
    lines = _balanced(text, measure, width, line_h)
    cut = text != item.text or len(lines) > max_lines
    if cut and not may_cut:
        return None
    lines = truncate(lines, max_lines, measure, width)
    if not lines:
        return None
    tw, th = math.ceil(max(map(measure, lines))), len(lines) * line_h
    w, h = (math.ceil(k * (d + inner) + 2 * ext + core) for d in (tw, th))
    return _Sized(font, direction, lines, line_h, pad, lw, ext, tw, th, w, h, cut)


def _balanced(text: str, measure, width: int, line_h: int) -> list[str]:
    """``text`` wrapped into about sqrt(length / (ASPECT x line_h)) lines (a block ASPECT times as wide as tall) of
    at most ``width`` px, at the narrowest width that keeps that many lines (balanced lines)."""
    length = measure(text)
    lines = max(1, round(math.sqrt(length / (ASPECT * line_h))))
    if lines == 1 and length <= width:
        return [text]
    fits = lambda w: len(wrap(text, measure, w)) <= lines  # noqa: E731
    # never narrower than a word (words of wide CJK characters break anywhere)
    word = max([measure(w) for w in text.split(" ") if not any(unicodedata.east_asian_width(c) in "WF" for c in w)],
               default=1)
    if word >= width or not fits(width):
        return wrap(text, measure, width)
    narrow = width - _longest(lambda d: fits(width - d), 0, width - math.ceil(word))
    return wrap(text, measure, narrow)


def _window_sums(grid: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Sum of ``grid`` over every ch x cw window, indexed by the window's top-left cell."""
    s = np.pad(grid.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return s[ch:, cw:] - s[:-ch, cw:] - s[ch:, :-cw] + s[:-ch, :-cw]


class _Area:
    """Where a panel's bubbles may go: ``(x0, y0, x1, y1)`` on the page, as a grid of ``g`` px cells, with the
    cells covering characters (``forbidden``) and those taken by bubbles and their gaps (``taken``)."""

    def __init__(self, box: tuple, forbidden: np.ndarray | None):
        self.box = box
        w, h = box[2] - box[0], box[3] - box[1]
        self.g = g = max(1, math.ceil(max(w, h, 1) / GRID))
        self.cols, self.rows = max(w, 0) // g, max(h, 0) // g
        self.taken = np.zeros((self.rows, self.cols), dtype=bool)
        self.forbidden = np.zeros_like(self.taken)
        if forbidden is not None and self.rows and self.cols:
            f = forbidden[:self.rows * g, :self.cols * g]
            self.forbidden = f.reshape(self.rows, g, self.cols, g).any(axis=(1, 3))

    def place(self, w: int, h: int, after: tuple | None, gap: int, force: bool):
        """Top-left ``(x, y)`` of a w x h bubble, and whether rules were relaxed (``force`` only): the first free
        position after ``after`` (the previous bubble's box) in left-to-right reading order, covering the fewest
        character cells. None when nothing fits (without ``force``: nothing free in reading order)."""
        g = self.g
        cw, ch = math.ceil(w / g), math.ceil(h / g)
        if cw > self.cols or ch > self.rows or cw == 0 or ch == 0:
            return None
        taken = _window_sums(self.taken, ch, cw)
        covered = _window_sums(self.forbidden, ch, cw)
        ys, xs = np.meshgrid(self.box[1] + g * np.arange(taken.shape[0]), self.box[0] + g * np.arange(taken.shape[1]),
                             indexing="ij")
        ordered = np.ones_like(taken, dtype=bool)
        if after is not None:
            ordered = (ys >= after[3] + gap) | ((ys >= after[1]) & (xs >= after[2] + gap))
        relaxed = False
        for valid in ((taken == 0) & ordered, taken == 0, np.ones_like(ordered)):
            if valid.any():
                break
            if not force:
                return None
            relaxed = True
        order = np.lexsort((xs[valid], ys[valid], covered[valid], taken[valid]))
        y, x = int(ys[valid][order[0]]), int(xs[valid][order[0]])
        x0, y0 = (x - gap - self.box[0]) // g, (y - gap - self.box[1]) // g
        x1, y1 = -(-(x + w + gap - self.box[0]) // g), -(-(y + h + gap - self.box[1]) // g)
        self.taken[max(y0, 0):y1, max(x0, 0):x1] = True
        return x, y, relaxed


def _tail_tip(item, box: tuple, panel: "_Placed", area: tuple, size: int, others: list) -> tuple[int, int] | None:
    """Where the tail of ``item`` (placed at ``box``) ends, in page pixels (module docstring); ``others``: the
    boxes of the panel's other bubbles."""
    if item.speaker is None:
        return None
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    region = panel.regions.get(item.speaker)
    if region is not None and region.any():
        step = max(1, math.ceil(max(region.shape) / 512))  # bounded search on huge panels
        pts = np.argwhere(region[::step, ::step]) * step
        d = (pts[:, 0] + panel.box[1] - cy) ** 2 + (pts[:, 1] + panel.box[0] - cx) ** 2
        y, x = pts[int(np.argmin(d))]
        # then up to one font size deeper into the region along the same line, off its fuzzy edge
        dx, dy = x + panel.box[0] - cx, y + panel.box[1] - cy
        norm = max(math.hypot(dx, dy), 1e-9)
        for k in range(size, 0, -1):
            xi, yi = int(round(x + dx / norm * k)), int(round(y + dy / norm * k))
            if 0 <= yi < region.shape[0] and 0 <= xi < region.shape[1] and region[yi, xi]:
                x, y = xi, yi
                break
        return int(x + panel.box[0]), int(y + panel.box[1])
    if item.speaker in panel.characters:
        frac = (panel.characters.index(item.speaker) + 0.5) / len(panel.characters)
        x = area[2] - frac * (area[2] - area[0]) if panel.rtl else area[0] + frac * (area[2] - area[0])
        tip = x, min(box[3] + max(2 * size, 0.15 * (area[3] - area[1])), area[3] - 1)
    else:
        tip = (area[0] if cx - area[0] < area[2] - cx else area[2] - 1), cy
    # a heuristic target: stop short of the other bubbles instead of running under them
    steps = max(1, int(math.hypot(tip[0] - cx, tip[1] - cy) // 2))
    others = [o for o in others if o[0] <= max(cx, tip[0]) and min(cx, tip[0]) < o[2] and o[1] <= max(cy, tip[1])
              and min(cy, tip[1]) < o[3]]
    for k in range(1, steps + 1 if others else 0):
        x, y = cx + (tip[0] - cx) * k / steps, cy + (tip[1] - cy) * k / steps
        if any(o[0] <= x < o[2] and o[1] <= y < o[3] for o in others):
            return int(cx + (tip[0] - cx) * (k - 1) / steps), int(cy + (tip[1] - cy) * (k - 1) / steps)
    return int(tip[0]), int(tip[1])


def _ellipse(cx, cy, a, b, angles) -> list[tuple[float, float]]:
    return [(cx + a * math.cos(t), cy + b * math.sin(t)) for t in angles]


def _extend(cx, cy, a, b, tip, length: float, panel_box: tuple) -> tuple[float, float]:
    """``tip``, moved out along the ray from the centre to at least ``length`` px beyond the ellipse (a target
    under the bubble itself), kept inside the panel."""
    dx, dy = tip[0] - cx, tip[1] - cy
    norm = math.hypot(dx / a, dy / b)
    dist = math.hypot(dx, dy)
    if norm == 0 or dist == 0:
        dx, dy, norm, dist = 0.0, 1.0, 1 / b, 1.0
    edge = dist / norm
    if dist < edge + length:
        dx, dy = dx / dist * (edge + length), dy / dist * (edge + length)
    return (min(max(cx + dx, panel_box[0]), panel_box[2] - 1), min(max(cy + dy, panel_box[1]), panel_box[3] - 1))


@dataclass(frozen=True)
class _Shape:
    """A placed bubble's geometry (overlay pixels): centre, ellipse semi-axes, the tail's tip (None: no tail)
    and the angle of the outline where the tail leaves it."""

    cx: float
    cy: float
    a: float
    b: float
    tip: tuple | None
    angle: float


def _shape(item, s: _Sized, x: int, y: int, tip, panel_box: tuple, size: int) -> _Shape:
    cx, cy = x + s.w / 2, y + s.h / 2
    a, b = math.sqrt(2) * (s.tw / 2 + s.pad + s.lw), math.sqrt(2) * (s.th / 2 + s.pad + s.lw)
    if tip is None or item.kind == NARRATION:
        return _Shape(cx, cy, a, b, None, 0.0)
    tip = _extend(cx, cy, a, b, tip, size + s.ext + s.lw, panel_box)
    return _Shape(cx, cy, a, b, tip, math.atan2((tip[1] - cy) / b, (tip[0] - cx) / a))


def _line(draw: ImageDraw.ImageDraw, pts, lw: int, dashed: bool) -> None:
    """An open polyline through ``pts``: solid, or dashed (whispers)."""
    if not dashed:
        draw.line(pts, fill=INK, width=lw, joint="curve")
        return
    on, off = 3 * lw + 3, 2 * lw + 3
    pos = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        length, done = math.hypot(x1 - x0, y1 - y0), 0.0
        while done < length:
            phase = pos % (on + off)
            step = min((on - phase) if phase < on else (on + off - phase), length - done)
            if phase < on:
                f0, f1 = done / length, (done + step) / length
                draw.line([(x0 + (x1 - x0) * f0, y0 + (y1 - y0) * f0), (x0 + (x1 - x0) * f1, y0 + (y1 - y0) * f1)],
                          fill=INK, width=lw)
            done += step
            pos += step


def _draw_tail(draw: ImageDraw.ImageDraw, item, s: _Sized, g: _Shape) -> None:
    """The tail (thought: the trailing circles), drawn before every body so that bodies cover tails that cross
    them; its base lies inside its own body, which covers it."""
    if g.tip is None:
        return
    if item.kind == "thought":
        r = max(s.ext, 2)
        dx, dy = g.tip[0] - g.cx, g.tip[1] - g.cy
        edge = math.hypot(dx, dy) / max(math.hypot(dx / g.a, dy / g.b), 1e-9)
        start = (edge + r) / max(math.hypot(dx, dy), 1e-9)
        trail = [(g.cx + dx * (start + (1 - start) * f), g.cy + dy * (start + (1 - start) * f), max(2.0, r * q))
                 for f, q in ((0.2, 0.5), (0.6, 0.36), (1.0, 0.24))]
        for px, py, rr in trail:
            draw.ellipse((px - rr - s.lw, py - rr - s.lw, px + rr + s.lw, py + rr + s.lw), fill=INK)
            draw.ellipse((px - rr, py - rr, px + rr, py + rr), fill=FILL)
        return
    left, right = _ellipse(g.cx, g.cy, g.a, g.b, [g.angle - TAIL_HALF_ANGLE, g.angle + TAIL_HALF_ANGLE])
    draw.polygon([left, g.tip, right, (g.cx, g.cy)], fill=FILL)
    _line(draw, [left, g.tip, right], s.lw, item.kind == "whisper")


def _draw_body(draw: ImageDraw.ImageDraw, item, s: _Sized, x: int, y: int, g: _Shape) -> None:
    """The body, its outline open where the tail leaves it, and the text."""
    lw, ext = s.lw, s.ext
    if item.kind == NARRATION:
        draw.rectangle((x, y, x + s.w - 1, y + s.h - 1), fill=NARRATION_FILL, outline=INK, width=lw)
    elif item.kind == "thought":
        r = max(ext, 2)
        n = max(8, round(2 * math.pi * math.sqrt((g.a ** 2 + g.b ** 2) / 2) / (1.4 * r)))
        bumps = _ellipse(g.cx, g.cy, g.a, g.b, [2 * math.pi * i / n for i in range(n)])
        for grow, color in ((lw, INK), (0, FILL)):
            draw.ellipse((g.cx - g.a - grow, g.cy - g.b - grow, g.cx + g.a + grow, g.cy + g.b + grow), fill=color)
            for px, py in bumps:
                draw.ellipse((px - r - grow, py - r - grow, px + r + grow, py + r + grow), fill=color)
    else:
        spikes = item.kind == "shout"
        n = 2 * max(8, round(math.pi * (g.a + g.b) / (3 * ext))) + 1 if spikes else 97  # odd: ends on the ellipse
        gap = 0.0 if g.tip is None else TAIL_HALF_ANGLE
        angles = [g.angle + gap + (2 * math.pi - 2 * gap) * i / (n - 1) for i in range(n)]
        arc = [_ellipse(g.cx, g.cy, g.a + grow, g.b + grow, [t])[0]
               for t, grow in zip(angles, [ext if spikes and i % 2 else 0 for i in range(n)])]
        mouth = _ellipse(g.cx, g.cy, g.a, g.b, [g.angle - gap + 2 * gap * i / 8 for i in range(9)])
        draw.polygon(arc + mouth, fill=FILL)
        _line(draw, arc if g.tip is not None else arc + arc[:1], lw, item.kind == "whisper")
    top = g.cy - s.th / 2
    for i, line in enumerate(s.lines):
        draw.text((g.cx, top + i * s.line_h), line, font=s.font, fill=INK, anchor="ma", direction=s.direction)


@dataclass(frozen=True)
class _PanelInfo:
    """One panel's dialogue lines, its named characters in story order, their mask rows (name -> (H, W) tensor;
    empty without masks) and the reading direction."""

    dialogue: tuple
    characters: tuple
    masks: dict
    rtl: bool


@dataclass(frozen=True)
class _Placed:
    """A panel being drawn: its box on the page and its characters' mask regions (bool, box sized)."""

    box: tuple
    characters: tuple
    regions: dict
    rtl: bool


def _fit_panel(info: _PanelInfo, panel: _Placed, area_box: tuple, fonts: CaptionFonts, start: int):
    """Font size, measured bubbles, their positions ((x, y, relaxed) or None) and which overflowed."""
    forbidden = None
    if panel.regions:
        px0, py0 = area_box[0] - panel.box[0], area_box[1] - panel.box[1]
        union = np.logical_or.reduce(list(panel.regions.values()))
        forbidden = union[py0:py0 + area_box[3] - area_box[1], px0:px0 + area_box[2] - area_box[0]]
        forbidden = forbidden[:, ::-1] if info.rtl else forbidden
    # right to left is placed left to right in the mirrored area, then mirrored back
    mirror = (lambda x, w: area_box[0] + area_box[2] - x - w) if info.rtl else (lambda x, w: x)  # noqa: E731
    max_w, max_h = area_box[2] - area_box[0], area_box[3] - area_box[1]
    size = start
    while True:
        final = size <= MIN_FONT
        area, sized, spots, prev = _Area(area_box, forbidden), [], [], None
        gap = max(2, size // 3)
        for d in info.dialogue:
            s = _measure(d, fonts, size, max_w, max_h, may_cut=final)
            spot = area.place(s.w, s.h, prev, gap, force=final) if s else None
            if spot is None and not final:
                break
            if spot is not None:
                prev = (spot[0], spot[1], spot[0] + s.w, spot[1] + s.h)
                spot = (mirror(spot[0], s.w), spot[1], spot[2])
            sized.append(s)
            spots.append(spot)
        else:
            over = [s is None or p is None or s.cut or p[2] for s, p in zip(sized, spots)]
            return size, sized, spots, over
        size = max(MIN_FONT, int(size * SHRINK))


class DialogueDrawer:
    """Draws each panel's dialogue (``compose_pages``' ``on_panel`` hook) and records the bubbles and their masks.

    One object per ``compose_comic`` call (nothing outlives it). ``panels``: a ``_PanelInfo`` per panel index;
    ``image_hw``: the panel images' size (masks are resized to it before the panels' centre crop).
    """

    def __init__(self, spec: LayoutSpec, panels: list, fonts: CaptionFonts | None, image_hw: tuple):
        self.spec, self.panels, self.fonts, self.image_hw = spec, panels, fonts, image_hw
        self.bubbles: list[Bubble] = []
        self.masks: dict[int, np.ndarray] = {}

    def __call__(self, page_no: int, i: int, page: Image.Image, box: tuple, caption_top: int) -> None:
        info = self.panels[i]
        if not info.dialogue:
            return
        x0, y0, x1, y1 = box
        panel = _Placed(box, info.characters, _regions(info.masks, self.image_hw, box), info.rtl)
        margin = max(3, min(x1 - x0, y1 - y0) // 40)
        area = (x0 + margin, y0 + margin, x1 - margin, min(y1, caption_top) - margin)
        size, sized, spots, over = _fit_panel(info, panel, area, self.fonts, self.spec.caption_font_size)
        bodies = [None if s is None or p is None else (p[0], p[1], p[0] + s.w, p[1] + s.h) for s, p in zip(sized, spots)]
        shapes = []
        for k, (item, s, body, bad) in enumerate(zip(info.dialogue, sized, bodies, over)):
            record = dict(page=page_no, panel=i, line=item.line, kind=item.kind, speaker=item.speaker,
                          text=item.text, font_size=size, overflow=bad)
            if body is None:
                self.bubbles.append(Bubble(box=None, text_box=None, tail=None, lines=(), line_height=0, **record))
                continue
            others = [b for j, b in enumerate(bodies) if b is not None and j != k]
            target = _tail_tip(item, body, panel, area, size, others)
            local_tip = None if target is None else (target[0] - x0, target[1] - y0)
            g = _shape(item, s, body[0] - x0, body[1] - y0, local_tip, (0, 0, x1 - x0, y1 - y0), size)
            shapes.append((item, s, body, g))
            cx, cy, hw, hh = g.cx + x0, g.cy + y0, s.tw / 2 + s.pad, s.th / 2 + s.pad
            text_box = (math.ceil(cx - hw), math.ceil(cy - hh), math.floor(cx + hw), math.floor(cy + hh))
            tail = None if g.tip is None else (round(g.tip[0] + x0), round(g.tip[1] + y0))
            self.bubbles.append(Bubble(box=body, text_box=text_box, tail=tail, lines=tuple(s.lines),
                                       line_height=s.line_h, **record))
        overlay = Image.new("RGBA", (x1 - x0, y1 - y0), (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        for item, s, body, g in shapes:
            _draw_tail(draw, item, s, g)
        for item, s, body, g in shapes:
            _draw_body(draw, item, s, body[0] - x0, body[1] - y0, g)
        if any(over):
            lines = [str(d.line) for d, o in zip(info.dialogue, over) if o]
            more = f" and {len(lines) - 10} more" if len(lines) > 10 else ""
            log.warning("%s: the dialogue of panel %d does not fit (story lines %s%s), even at %d px: drawn cut or "
                        "overlapping", NODE_ID, i + 1, ", ".join(lines[:10]), more, size)
        region = page.crop(box).convert("RGBA")
        page.paste(Image.alpha_composite(region, overlay).convert("RGB"), box[:2])
        mask = self.masks.setdefault(page_no, np.zeros((self.spec.page_height, self.spec.page_width), np.float32))
        mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], np.asarray(overlay)[..., 3] / 255.0)

    def layout_json(self) -> str:
        """The bubbles as a JSON list of objects (``Bubble``'s fields; tuples as lists)."""
        return json.dumps([asdict(b) for b in self.bubbles], ensure_ascii=False)

    def mask_batch(self, pages: int) -> torch.Tensor:
        """MASK ``(pages, page_height, page_width)`` float32: 1 where a bubble (tail, box) covers the page."""
        out = torch.zeros(pages, self.spec.page_height, self.spec.page_width)
        for page_no, mask in self.masks.items():
            out[page_no] = torch.from_numpy(mask)
        return out


def _regions(masks: dict, image_hw: tuple, box: tuple) -> dict:
    """Each character's mask region (mask >= MASK_THRESHOLD) in the panel ``box``, resized to the image size and
    centre-cropped exactly as the panel image."""
    w, h = box[2] - box[0], box[3] - box[1]
    out = {}
    for name, row in masks.items():
        img = Image.fromarray((row.detach().float().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8))
        img = img.resize(image_hw[::-1], Image.Resampling.BILINEAR)
        out[name] = np.asarray(fit_cover(np.asarray(img), w, h)) >= MASK_THRESHOLD * 255
    return out


def _words(captions, count: int = 0) -> list[str]:
    """Captions compared by their words, padded with empty ones to ``count``."""
    return [" ".join(c.split()) for c in list(captions) + [""] * (count - len(captions))]


def compose_comic(images: torch.Tensor, spec: LayoutSpec, captions: list[str] | None = None, story=None,
                  character_masks: torch.Tensor | None = None,
                  comic: bool = True) -> tuple[torch.Tensor, str, torch.Tensor]:
    """Comic pages with captions and dialogue bubbles (SDN_ComicLayout).

    images, spec, captions: as ``compose_pages``. story: a parser ``Story`` with one panel per image (panel i =
    image i); its captions are used (``captions`` must then be empty or the same words) and its panels' dialogue
    is drawn.
    character_masks: MASK ``(panels x characters, H, W)`` in 0..1, row = panel x characters + character (story
    order; SDN_CharacterMaskImages' output), any H x W of the panels' aspect; needs ``story``.
    comic: letter bubbles in an installed comic font when ``spec.font_path`` is empty or lacks characters (the
    node); False skips comic fonts, so pages drawn in Pillow's font look the same on every machine (thumbnails).
    Returns ``(pages, layout, bubble_masks)``: IMAGE ``(pages, page_height, page_width, 3)``, the bubbles as a
    JSON list (``Bubble``'s fields), MASK ``(pages, page_height, page_width)`` float32, 1 on the bubbles.
    NodeInputError as ``compose_pages``; for captions other than the story's, a story whose panel count is not the
    images', masks without a story
    or with another row count, and dialogue no font can draw (input ``story``).
    """
    count = images.shape[0] if isinstance(images, torch.Tensor) and images.ndim == 4 else None
    names = tuple(story.characters) if story is not None else ()
    if character_masks is not None:
        if story is None:
            raise NodeInputError(NODE_ID, "character_masks", "the story input connected too (it tells which rows "
                                 "belong to which panel and character)", got="masks without a story")
        if (not isinstance(character_masks, torch.Tensor) or character_masks.ndim != 3
                or count is None or character_masks.shape[0] != count * len(names)):
            raise NodeInputError(NODE_ID, "character_masks", f"a MASK of {count} panels x {len(names)} characters "
                                 "rows (SDN_CharacterMaskImages' masks of these panels)",
                                 got=str(tuple(character_masks.shape)) if isinstance(character_masks, torch.Tensor)
                                 else type(character_masks).__name__)
    infos, fonts = [], None
    if story is not None:
        if count is not None and len(story.panels) != count:
            raise NodeInputError(NODE_ID, "story", f"the story of these {count} panel images (one panel per image)",
                                 got=f"a story of {len(story.panels)} panels")
        if captions and any(captions) and _words(captions, len(story.panels)) != _words(story.captions):
            raise NodeInputError(NODE_ID, "captions", "empty, or the connected story's captions (the story gives the "
                                 "captions when it is connected)",
                                 got=f"{len(captions)} lines that differ from the story's {len(story.panels)} captions")
        captions = list(story.captions)
        rtl = spec.reading_direction == "right-to-left"
        for k, p in enumerate(story.panels):
            masks = {} if character_masks is None else {
                n: character_masks[k * len(names) + names.index(n)] for n in p.characters}
            infos.append(_PanelInfo(p.dialogue, p.characters, masks, rtl))
        texts = [(d.text, f"panel {k + 1}, line {d.line}") for k, p in enumerate(story.panels) for d in p.dialogue]
        if texts:
            fonts = CaptionFonts(spec.font_path, comic=comic, input_name="story")
            fonts.pick([t for t, _ in texts], [label for _, label in texts])
    drawer = DialogueDrawer(spec, infos, fonts, tuple(images.shape[1:3]) if count else (1, 1))
    pages = compose_pages(images, spec, captions, on_panel=drawer if fonts is not None else None)
    return pages, drawer.layout_json(), drawer.mask_batch(pages.shape[0])
