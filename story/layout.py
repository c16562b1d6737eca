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
Captions: drawn in a translucent white box across the panel bottom, black text, wrapped at spaces and between
CJK characters (a word wider than the panel is broken between characters; each line's end is found by
galloping/bisection, so wrapping is about linear in the caption length); the font shrinks down to 6 px if the
wrapped text would take more than half of the panel, and lines that still do not fit are dropped with "..." so
text never leaves the panel. Any script: each caption is drawn in a font that has all its characters
(``CaptionFonts``: ``font_path``, Pillow's default, installed fonts), right-to-left captions (Hebrew, Arabic)
are laid out, shaped and right-aligned by Pillow's raqm layout; a caption no font can draw is an error, never a
row of boxes. Cells with no panel on the last page are left as background.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont, features

from ..errors import NodeInputError

NODE_ID = "SDN_ComicLayout"
LAYOUTS = ("grid", "four panel", "classic", "strip")
DIRECTIONS = ("left-to-right", "right-to-left")
CLASSIC_PATTERN = (1, 2, 3)
MIN_FONT = 6
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
PROBE_SIZE = 32  # px; only for coverage probes
NOTDEF_PROBE = chr(0x10FFFF)  # a noncharacter: every font draws its .notdef glyph for it
FC_MAX_CHARS = 2000  # characters named in one fontconfig query (a hint; coverage is checked after)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class FontFile:
    """One font face: a file ``path`` (None = Pillow's built-in default font) and its ``index`` in a collection."""

    path: str | None
    index: int = 0


def font_dirs() -> list[str]:
    """The standard font folders of Linux, macOS and Windows that exist on this machine."""
    home = os.path.expanduser("~")
    dirs = ["/usr/share/fonts", "/usr/local/share/fonts", os.path.join(home, ".fonts"),
            os.path.join(home, ".local", "share", "fonts"), "/Library/Fonts", "/System/Library/Fonts",
            os.path.join(home, "Library", "Fonts"), os.path.join(os.environ.get("WINDIR", r"C:\Windows"), "Fonts")]
    if os.environ.get("LOCALAPPDATA"):
        dirs.append(os.path.join(os.environ["LOCALAPPDATA"], "Microsoft", "Windows", "Fonts"))
    return [d for d in dirs if os.path.isdir(d)]


def system_fonts(chars: str, fc_match: str | None, folders: list[str]) -> Iterator[FontFile]:
    """Installed fonts, the likeliest to have glyphs for ``chars`` first (a hint: callers check coverage).

    With fontconfig (``fc_match``: path of its ``fc-match`` command) its sorted match for a sans-serif font with
    that charset, as ``fc-match -s 'sans-serif:charset=...'`` prints it; else (or when fc-match fails) every
    .ttf/.otf/.ttc/.otc file under ``folders``, regular styles first (face 0 of collections).
    """
    if fc_match:
        pattern = "sans-serif:charset=" + " ".join(f"{ord(c):x}" for c in chars[:FC_MAX_CHARS])
        try:
            out = subprocess.run([fc_match, "-s", "--format=%{file}\t%{index}\n", pattern], capture_output=True,
                                 text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        faces = [line.split("\t") for line in out.splitlines() if line.count("\t") == 1]
        if faces:
            yield from (FontFile(path, int(index or 0)) for path, index in faces)
            return
    files = []
    for folder in folders:
        for root, _, names in os.walk(folder):
            files += [os.path.join(root, n) for n in names if n.lower().endswith(FONT_SUFFIXES)]
    styled = ("bold", "italic", "oblique", "light", "thin", "black", "condensed", "mono")
    files.sort(key=lambda f: (any(s in os.path.basename(f).lower() for s in styled), f))
    yield from (FontFile(f) for f in files)


COMIC_FAMILIES = ("Comic Neue", "Comic Relief", "Comic Sans MS")
COMIC_FILES = ("comicneue-regular.", "comicneue.", "comicrelief.", "comic.ttf", "comic sans ms.")


def comic_fonts(fc_match: str | None, folders: list[str]) -> list[FontFile]:
    """Installed comic lettering fonts (``COMIC_FAMILIES``), best first: with fontconfig (``fc_match``: path of
    its ``fc-match``) the families it resolves to themselves (fc-match always answers, with a substitute when the
    family is missing), else files under ``folders`` whose names start with one of ``COMIC_FILES``
    (case-insensitive). Empty when none is installed."""
    if fc_match:
        found = []
        for family in COMIC_FAMILIES:
            try:
                out = subprocess.run([fc_match, "--format=%{family}\t%{file}\t%{index}", f"{family}:style=Regular"],
                                     capture_output=True, text=True, timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            parts = out.split("\t")
            if len(parts) == 3 and family.lower() in parts[0].lower().split(","):
                found.append(FontFile(parts[1], int(parts[2] or 0)))
        return list(dict.fromkeys(found))
    files = [os.path.join(root, n) for folder in folders for root, _, names in os.walk(folder) for n in names]
    return [FontFile(f) for prefix in COMIC_FILES for f in sorted(files) if os.path.basename(f).lower().startswith(prefix)]


def _open(face: FontFile, size: int, layout_engine=None):
    if face.path is None:
        font = ImageFont.load_default(size=size)
        return font if layout_engine is None else font.font_variant(layout_engine=layout_engine)
    return ImageFont.truetype(face.path, size=size, index=face.index, layout_engine=layout_engine)


def _needs_glyph(ch: str) -> bool:
    # spaces, controls, format characters (ZWJ, bidi marks) and variation selectors draw nothing themselves
    return (unicodedata.category(ch) not in ("Zs", "Zl", "Zp", "Cc", "Cf")
            and not 0xFE00 <= ord(ch) <= 0xFE0F and not 0xE0100 <= ord(ch) <= 0xE01EF)


def text_direction(text: str) -> str:
    """``"rtl"`` when the first strong character is right-to-left (Hebrew, Arabic...), else ``"ltr"`` (UAX #9 P2)."""
    for ch in text:
        kind = unicodedata.bidirectional(ch)
        if kind in ("R", "AL"):
            return "rtl"
        if kind == "L":
            return "ltr"
    return "ltr"


def direction_of(font, text: str) -> str | None:
    # only raqm takes a paragraph direction; Pillow's default font always uses the basic (left-to-right) layout
    return text_direction(text) if font.layout_engine == ImageFont.Layout.RAQM else None


class CaptionFonts:
    """The caption fonts of one ``compose_pages`` call (a fresh object per call: no state outlives it).

    A caption is drawn in ONE font, the first of these that has a glyph for each of its characters: the user's
    ``font_path``, with ``comic`` an installed comic font (``comic_fonts``, for speech bubbles), Pillow's default
    font, a font already picked in this call, then the installed fonts (``system_fonts``: fontconfig, else the
    standard font folders). Coverage is asked of FreeType itself: a
    character the font's cmap lacks is drawn as glyph 0 (.notdef), so it draws exactly what U+10FFFF (a
    noncharacter, mapped by no font) draws. Pillow alone does this, so the pack needs no font library.
    Right-to-left and shaped scripts need Pillow's raqm layout (libraqm, with FriBiDi at run time).
    ``fc_match``/``folders`` default to this machine's (tests pass others). ``input_name``: the node input that
    errors about the texts name (``captions``; ``story`` for dialogue).
    """

    def __init__(self, font_path: str = "", fc_match: str | None = "auto", folders: list[str] | None = None,
                 comic: bool = False, input_name: str = "captions"):
        self.user = None
        if font_path and font_path.strip():
            path = os.path.expanduser(font_path.strip())
            try:
                ImageFont.truetype(path, size=PROBE_SIZE)
            except (OSError, ValueError) as exc:
                raise NodeInputError(NODE_ID, "font_path", "a readable TrueType/OpenType font file, or empty for "
                                     "an automatic choice", got=f"'{font_path}' ({exc})") from None
            self.user = FontFile(path)
        self.fc_match = shutil.which("fc-match") if fc_match == "auto" else fc_match
        self.folders = font_dirs() if folders is None else folders
        self.comic = comic_fonts(self.fc_match, self.folders) if comic else []
        self.input_name = input_name
        self.raqm = features.check_feature("raqm")
        self._fonts: dict[tuple[FontFile, int], ImageFont.FreeTypeFont] = {}
        self._probes: dict[FontFile, tuple | None] = {}
        self._covered: dict[tuple[FontFile, str], bool] = {}
        self._faces: dict[str, FontFile] = {}
        self._picked: list[FontFile] = []

    def font(self, face: FontFile, size: int):
        """``face`` at ``size`` px, with Pillow's default layout engine (raqm when available), loaded once."""
        key = (face, max(int(size), 1))
        if key not in self._fonts:
            self._fonts[key] = _open(face, key[1])
        return self._fonts[key]

    def _lacks(self, face: FontFile, ch: str) -> bool:
        if (face, ch) not in self._covered:
            if face not in self._probes:
                try:
                    probe = _open(face, PROBE_SIZE, ImageFont.Layout.BASIC)
                    self._probes[face] = (probe, _glyph(probe, NOTDEF_PROBE))
                except (OSError, ValueError):  # an unreadable or bitmap-only font file: never picked
                    self._probes[face] = None
            if self._probes[face] is None:
                return True
            probe, notdef = self._probes[face]
            self._covered[face, ch] = _glyph(probe, ch, notdef) != notdef
        return not self._covered[face, ch]

    def _candidates(self, chars: list[str]) -> Iterator[FontFile]:
        yield from [self.user] if self.user else []
        yield from self.comic
        yield FontFile(None)
        yield from list(self._picked)
        lacking = "".join(c for c in chars if self._lacks(FontFile(None), c))
        yield from system_fonts(lacking, self.fc_match, self.folders)

    def _find(self, text: str) -> tuple[FontFile | None, list[str]]:
        """The first candidate with every character of ``text`` (and "..."), or None and the characters that
        no candidate has, in text order."""
        chars = [c for c in dict.fromkeys(text + "...") if _needs_glyph(c)]
        uncovered, seen = set(chars), set()
        for face in self._candidates(chars):
            if face in seen:
                continue
            seen.add(face)
            lacks = {c for c in chars if self._lacks(face, c)}
            uncovered &= lacks
            if not lacks:
                if self.user and face != self.user:
                    log.warning("%s: the font in font_path lacks %r; drawing in %s instead", NODE_ID,
                                "".join(c for c in chars if self._lacks(self.user, c)),
                                face.path or "Pillow's default font")
                if face not in self._picked:
                    self._picked.append(face)
                return face, []
        return None, [c for c in chars if c in uncovered]

    def _check_direction(self, text: str, label: str) -> None:
        rtl = [c for c in dict.fromkeys(text) if unicodedata.bidirectional(c) in ("R", "AL")]
        if rtl and not self.raqm:
            raise NodeInputError(NODE_ID, self.input_name, "right-to-left text only where Pillow has its raqm layout "
                                 "(libraqm, which loads FriBiDi at run time: install libfribidi0 on Debian/Ubuntu, fribidi with "
                                 "Homebrew on macOS)",
                                 got=f"{label} with {_listing(rtl)}")

    def face_for(self, text: str, caption: int = 0, label: str | None = None) -> FontFile:
        """The font face that draws ``text`` (caption number ``caption``, 0-based, or ``label`` such as
        ``"panel 2, line 7"``, for messages).

        NodeInputError (input ``input_name``) when the text has right-to-left characters and Pillow lacks raqm,
        or when no available font has a glyph for some character (they are listed, escaped with repr).
        """
        if text not in self._faces:
            label = label or f"caption {caption + 1}"
            self._check_direction(text, label)
            face, uncovered = self._find(text)
            if face is None:
                got = (f"{label} with {_listing(uncovered)}, which no available font has" if uncovered
                       else f"{label}, whose characters no single available font has all of")
                raise NodeInputError(NODE_ID, self.input_name, "characters that the font in font_path or an "
                                     "installed font can draw (set font_path to a font that has them, or install "
                                     "one)", got=got)
            self._faces[text] = face
        return self._faces[text]

    def pick(self, captions: list[str], labels: list[str] | None = None) -> None:
        """Choose the faces of all ``captions`` before anything is drawn (errors first). Without ``font_path``:
        one face for all when a font has every character of every caption (one look per page); else one per
        caption (so the font in ``font_path`` draws every caption it can). ``labels``: how messages name each
        text (default ``caption i``)."""
        labels = labels or [f"caption {i + 1}" for i in range(len(captions))]
        for text, label in zip(captions, labels):
            if text:
                self._check_direction(text, label)
        face = None if self.user else self._find("".join(captions))[0]
        for text, label in zip(captions, labels):
            if text and face:
                self._faces[text] = face
            elif text:
                self.face_for(text, label=label)


def _listing(chars: list[str], limit: int = 40) -> str:
    """``'字…' (U+5B57 ...)``: the characters, escaped with repr, and their code points."""
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return f"{''.join(chars[:limit])!r} ({' '.join(f'U+{ord(c):04X}' for c in chars[:limit])}{more})"


def _glyph(font, ch: str, notdef: tuple | None = None) -> tuple:
    """What ``font`` (basic layout) draws for ``ch``: bbox and advance, plus its pixels when those equal
    ``notdef``'s (pixels are only needed to tell a real glyph from .notdef when their boxes agree)."""
    box, advance = font.getbbox(ch), font.getlength(ch)
    if notdef is not None and (box, advance) != notdef[:2]:
        return box, advance, None
    img = Image.new("L", (max(box[2] - box[0], 1), max(box[3] - box[1], 1)))
    ImageDraw.Draw(img).text((-box[0], -box[1]), ch, font=font, fill=255)
    return box, advance, img.tobytes()


def _breakable(text: str, i: int) -> bool:
    """May a line end between ``text[i - 1]`` and ``text[i]``? A small part of UAX #14: at spaces, and between
    characters where either is wide (CJK), never before a mark, a closing/other punctuation or a format
    character, nor after an opening punctuation or a zero-width joiner."""
    before, after = text[i - 1], text[i]
    if after == " " or before in " \u200b":
        return True
    if (unicodedata.category(after) in ("Mn", "Mc", "Me", "Pe", "Pf", "Po", "Cf") or before == "\u200d"
            or unicodedata.category(before) in ("Ps", "Pi")):
        return False
    return unicodedata.east_asian_width(before) in ("W", "F") or unicodedata.east_asian_width(after) in ("W", "F")


def _cluster_start(text: str, i: int, lo: int) -> int:
    """The nearest position <= i (and > lo) that does not split a character from its marks or a joiner."""
    while lo + 1 < i < len(text) and (unicodedata.category(text[i])[0] == "M" or "\u200d" in text[i - 1:i + 1]):
        i -= 1
    return i


def _longest(fits, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ``fits(n)`` (True up to some n, then False); ``lo`` when none fits.

    Galloping, then bisection: O(log n) calls, so wrapping costs O(length x log(line length)) measurements'
    worth of characters instead of re-measuring every shorter prefix.
    """
    ok, bad, step = lo, hi + 1, 1
    while ok + step < bad:
        if not fits(ok + step):
            bad = ok + step
            break
        ok, step = ok + step, step * 2
    while bad - ok > 1:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    return ok


def wrap(text: str, measure, width: int) -> list[str]:
    """Greedy line breaking of ``text`` (single spaces) into lines of at most ``width`` px by ``measure``
    (str -> px). Lines end at break opportunities (``_breakable``); a word wider than the line is cut between
    characters. Each line's end is found by ``_longest``, so the whole wrap is about linear in the length."""
    lines, start, n = [], 0, len(text)
    while start < n:
        end = _longest(lambda e: measure(text[start:e]) <= width, start + 1, n)
        if end < n:
            brk = next((i for i in range(end, start, -1) if _breakable(text, i)), None)
            end = brk if brk is not None else _cluster_start(text, end, start)
        lines.append(text[start:end].rstrip(" "))
        start = end
        while start < n and text[start] == " ":
            start += 1
    return lines


def layout_caption(text: str, box_w: int, box_h: int, spec: LayoutSpec, fonts: CaptionFonts | None = None):
    """Fit ``text`` into a panel of ``box_w`` x ``box_h`` px.

    ``fonts``: the call's CaptionFonts (a new one from ``spec.font_path`` when None). Returns
    ``(font, lines, line_height, pad)``; the caption block (lines plus padding) is at most half the panel tall
    and every line at most ``box_w - 2 * pad`` wide (measured in the caption's direction). Empty ``lines`` when
    nothing fits. NodeInputError as ``CaptionFonts.face_for``.
    """
    fonts = fonts or CaptionFonts(spec.font_path)
    text = " ".join(text.split())
    face = fonts.face_for(text)
    size, limit = spec.caption_font_size, box_h // 2
    while True:
        font = fonts.font(face, size)
        direction = direction_of(font, text)
        measure = lambda s: font.getlength(s, direction=direction)  # noqa: E731 (rebound per size)
        pad = max(2, size // 4)
        width = max(box_w - 2 * pad, 1)
        ascent, descent = font.getmetrics()
        line_h = ascent + descent + max(1, size // 8)
        # no line holds more than `width` px of words: where even that many lines are too tall, skip the wrap
        at_least = math.ceil(sum(map(measure, text.split(" "))) / width)
        if size > MIN_FONT and at_least * line_h + 2 * pad > limit:
            size = max(MIN_FONT, int(size * 0.85))
            continue
        lines = wrap(text, measure, width)
        if len(lines) * line_h + 2 * pad <= limit or size <= MIN_FONT:
            break
        size = max(MIN_FONT, int(size * 0.85))
    return font, truncate(lines, max((limit - 2 * pad) // line_h, 0), measure, width), line_h, pad


def truncate(lines: list[str], max_lines: int, measure, width: int) -> list[str]:
    """The first ``max_lines`` of wrapped ``lines``; when some are cut, the last kept one ends with "..." within
    ``width`` px (by ``measure``: str -> px). Empty when even that does not fit."""
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        if lines:
            last = lines[-1]
            keep = _longest(lambda k: measure(last[:k].rstrip(" ") + "...") <= width, 0, len(last))
            lines[-1] = last[:_cluster_start(last, keep, -1)].rstrip(" ") + "..."
    return [] if any(measure(l) > width for l in lines) else lines


def _draw_caption(page: Image.Image, box: tuple[int, int, int, int], text: str, spec: LayoutSpec,
                  fonts: CaptionFonts) -> int:
    """Draw ``text`` at the bottom of the panel ``box``; returns the caption box's top (``box[3]`` if none)."""
    x0, y0, x1, y1 = box
    font, lines, line_h, pad = layout_caption(text, x1 - x0, y1 - y0, spec, fonts)
    if not lines:
        return y1
    direction = direction_of(font, text)
    # right-to-left captions are right-aligned, as such text is set
    x, anchor = (x1 - x0 - pad, "ra") if direction == "rtl" else (pad, "la")
    top = y1 - (len(lines) * line_h + 2 * pad)
    overlay = Image.new("RGBA", (x1 - x0, y1 - top), (255, 255, 255, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, 0, overlay.width, overlay.height), fill=(255, 255, 255, 190))
    for i, line in enumerate(lines):
        draw.text((x, pad + i * line_h), line, font=font, fill=(0, 0, 0, 255), anchor=anchor, direction=direction)
    region = page.crop((x0, top, x1, y1)).convert("RGBA")
    page.paste(Image.alpha_composite(region, overlay).convert("RGB"), (x0, top))
    return top


def fit_cover(panel: np.ndarray, w: int, h: int) -> Image.Image:
    """Center-crop ``panel`` (H, W, 3 or H, W uint8) to the aspect w:h, then resize to w x h (Lanczos)."""
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


def compose_pages(images: torch.Tensor, spec: LayoutSpec, captions: list[str] | None = None,
                  on_panel=None) -> torch.Tensor:
    """Lay panels out on pages.

    images: IMAGE ``(B, H, W, C)`` float in 0..1 (C = 1, 3 or 4; alpha dropped, gray repeated), B >= 1.
    captions: per panel (``""`` or missing = none); at most B entries.
    on_panel: called as ``on_panel(page_no, panel_no, page, box, caption_top)`` after each panel and its caption
        are drawn (0-based numbers, the page as a PIL RGB image it may draw on, the panel box and the caption
        box's top on the page); story/bubbles.py draws dialogue this way.
    Returns IMAGE ``(pages, page_height, page_width, 3)`` float32 0..1 on the CPU,
    pages = ceil(B / cells per page). NodeInputError for bad settings, fonts, colors, caption count, or
    captions that no available font can draw (``CaptionFonts.face_for``).
    """
    validate(spec)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] not in (1, 3, 4):
        raise NodeInputError(NODE_ID, "images", "an IMAGE batch (B, H, W, C) with C in 1, 3, 4",
                             got=str(tuple(images.shape)) if isinstance(images, torch.Tensor) else type(images).__name__)
    captions = list(captions or [])
    if len(captions) > images.shape[0]:
        raise NodeInputError(NODE_ID, "captions", f"at most one line per panel ({images.shape[0]} panels)",
                             got=f"{len(captions)} lines")
    captions = [" ".join(c.split()) for c in captions]
    fonts = None
    if any(captions):
        fonts = CaptionFonts(spec.font_path)
        fonts.pick(captions)  # fail early: bad font path, characters no font has
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
            page.paste(fit_cover(arr[i], box[2] - box[0], box[3] - box[1]), box[:2])
            top = _draw_caption(page, box, captions[i], spec, fonts) if i < len(captions) and captions[i] else box[3]
            if on_panel is not None:
                on_panel(len(pages), i, page, box, top)
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
