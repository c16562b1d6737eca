"""Dialogue bubbles on comic pages: geometry (inside the panel, above the caption, no overlaps, reading order in
both directions), text inside its bubble (glyph boxes from the font, the bubble's fill measured in the pixels),
character masks (bubbles avoid them, tails end on the speaker), overflow reports, hostile input, fonts, errors.

Expected positions are checked against rules written here from the documented behaviour, on the drawn pixels
and the layout JSON; nothing is recomputed with story/bubbles.py's own helpers.
"""
import glob
import json
import logging
import math
import os
import stat
import time

import numpy as np
import pytest
import torch
from PIL import ImageFont

GRAY = 0.5  # panels: a flat mid gray, so the bubbles' white fill and black ink are told apart from the panel


@pytest.fixture(scope="module")
def B(pack):
    return pack("story.bubbles")


@pytest.fixture(scope="module")
def L(pack):
    return pack("story.layout")


@pytest.fixture(scope="module")
def P(pack):
    return pack("story.parser")


@pytest.fixture(scope="module")
def errors(pack):
    return pack("errors")


@pytest.fixture(scope="module")
def dejavu():
    found = glob.glob("/usr/share/fonts/**/DejaVuSans.ttf", recursive=True)
    if not found:
        if os.environ.get("CI"):
            pytest.fail("DejaVuSans.ttf is missing: run scripts/setup_test_env.sh as root")
        pytest.skip("DejaVuSans.ttf is missing: run scripts/setup_test_env.sh as root")
    return found[0]


STORY = """[Ann] a woman in a red coat
[Bob] a man with a hat
---
[Ann] and [Bob] at a bus stop # Monday.
> Ann: The bus is late again, as every single Monday morning.
> Bob (thought): She says that every week.
> Bob: Maybe it is not coming at all today.
> Ann (shout): THERE IT IS!
[Bob] alone
> The bus left without him.
> Bob (whisper): next time...
> Ann: Bob? Where are you?
[NC] an empty street
[Ann] running # Later.
> Ann (shout): WAIT!
"""


def grid(L, n=4, cell=200, gutter=8, border=3, **kw):
    """A page of n square cells in one row (panels of square images are scaled, never cropped)."""
    return L.LayoutSpec(layout="strip", columns=n, page_width=n * cell + (n + 1) * gutter,
                        page_height=cell + 2 * gutter, gutter=gutter, border_width=border, caption_font_size=16, **kw)


def panels(n, size=64):
    return torch.full((n, size, size, 3), GRAY)


def panel_boxes(L, spec, n):
    return [L.panel_box(c, spec.border_width) for c in L.cell_boxes(spec)[:n]]


def inside(inner, outer):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def caption_tops(L, spec, story, n):
    """Per panel, the first row of its caption box, from the pixels: captions drawn vs not."""
    plain = L.compose_pages(panels(n), spec)[0]
    captioned = L.compose_pages(panels(n), spec, list(story.captions))[0]
    tops = []
    for x0, y0, x1, y1 in panel_boxes(L, spec, n):
        rows = torch.nonzero((plain[y0:y1, x0:x1] - captioned[y0:y1, x0:x1]).abs().amax(dim=(1, 2)) > 0).flatten()
        tops.append(y0 + int(rows.min()) if len(rows) else y1)
    return tops


@pytest.mark.parametrize("direction", ["left-to-right", "right-to-left"])
def test_bubbles_inside_their_panel_above_captions_no_overlap_in_reading_order(B, L, P, direction):
    story = P.parse_story(STORY)
    spec = grid(L, reading_direction=direction)
    pages, layout, masks = B.compose_comic(panels(4), spec, story=story)
    bubbles = json.loads(layout)
    assert pages.shape == (1, spec.page_height, spec.page_width, 3) and masks.shape == (1, spec.page_height, spec.page_width)
    assert [(b["panel"], b["line"], b["kind"], b["speaker"]) for b in bubbles] == [
        (i, d.line, d.kind, d.speaker) for i, p in enumerate(story.panels) for d in p.dialogue]
    assert not any(b["overflow"] for b in bubbles)
    boxes, tops = panel_boxes(L, spec, 4), caption_tops(L, spec, story, 4)
    rtl = direction == "right-to-left"
    for i, (box, top) in enumerate(zip(boxes, tops)):
        mine = [b for b in bubbles if b["panel"] == i]
        for b in mine:
            body = b["box"]
            assert inside(body, (box[0] + 1, box[1] + 1, box[2] - 1, top - 1)), (b, box, top)  # off the border
            assert b["tail"] is None or (box[0] <= b["tail"][0] < box[2] and box[1] <= b["tail"][1] < box[3])
            assert (b["tail"] is None) == (b["kind"] == "narration")
        for a, c in zip(mine, mine[1:]):
            assert not overlap(a["box"], c["box"])
            after = c["box"][2] <= a["box"][0] if rtl else c["box"][0] >= a["box"][2]
            assert c["box"][1] >= a["box"][3] or (c["box"][1] >= a["box"][1] and after), (a, c)
        for a in mine:
            assert all(not overlap(a["box"], c["box"]) for c in mine if c is not a)
        if mine:  # reading starts in the top corner of the reading direction
            first = mine[0]["box"]
            assert first[1] - box[1] < 12 and (box[2] - first[2] < 12 if rtl else first[0] - box[0] < 12)
    # the bubble masks are the bubbles: every body's centre is covered, the page outside every panel is not
    m = masks[0]
    for b in bubbles:
        x0, y0, x1, y1 = b["box"]
        assert m[(y0 + y1) // 2, (x0 + x1) // 2] == 1
    outside = torch.ones_like(m, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        outside[y0:y1, x0:x1] = False
    assert m[outside].max() == 0 and m.sum() > 0
    # without a story, or with one without dialogue, the pages are what compose_pages draws
    plain = L.compose_pages(panels(4), spec, list(story.captions))
    no_dialogue = P.parse_story("\n".join(l for l in STORY.splitlines() if not l.startswith(">")))
    same, layout2, masks2 = B.compose_comic(panels(4), spec, story=no_dialogue)
    assert torch.equal(same, plain) and layout2 == "[]" and masks2.max() == 0
    assert not torch.equal(pages, plain)


def test_right_to_left_mirrors_the_order_of_bubbles(B, L, P):
    story = P.parse_story("[Ann] a woman\n---\n[Ann] talks\n> Ann: One.\n> Ann: Two.\n> Ann: Three.\n")
    spec = grid(L, n=1, cell=400)
    ltr = json.loads(B.compose_comic(panels(1), spec, story=story)[1])
    rtl = json.loads(B.compose_comic(panels(1), grid(L, n=1, cell=400, reading_direction="right-to-left"),
                                     story=story)[1])
    xs = [b["box"][0] for b in ltr]
    assert xs == sorted(xs) and len(set(xs)) == 3  # three short bubbles side by side
    assert [b["box"][2] for b in rtl] == sorted((b["box"][2] for b in rtl), reverse=True)
    width = spec.page_width
    assert [b["box"][2] for b in rtl] == [width - b["box"][0] for b in ltr]  # mirrored exactly


def glyph_boxes(font, bubble):
    """Ink boxes of each drawn line from the font's own metrics, where the layout says the line is drawn."""
    x0, y0, x1, y1 = bubble["text_box"]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    top = cy - len(bubble["lines"]) * bubble["line_height"] / 2
    out = []
    for i, line in enumerate(bubble["lines"]):
        l, t, r, b = font.getbbox(line, anchor="ma")
        y = top + i * bubble["line_height"]
        out.append((cx + l, y + t, cx + r, y + b))
    return out


@pytest.mark.parametrize("kind", ["speech", "thought", "shout", "whisper", "narration"])
def test_text_lies_inside_its_bubble(B, L, P, dejavu, kind):
    head = "Ann" if kind == "speech" else ("" if kind == "narration" else f"Ann ({kind})")
    text = "A few words that will have to wrap over some lines, with a longword"
    story = P.parse_story(f"[Ann] a woman\n---\n[Ann] talks\n> {head}: {text}\n> {head}: Short.\n")
    spec = grid(L, n=1, cell=300, font_path=dejavu)
    pages, layout, _ = B.compose_comic(panels(1), spec, story=story)
    page = (pages[0].numpy() * 255 + 0.5).astype(np.uint8)
    fill = (255, 244, 186) if kind == "narration" else (255, 255, 255)
    for bubble in json.loads(layout):
        font = ImageFont.truetype(dejavu, bubble["font_size"])
        assert " ".join(bubble["lines"]).split() == bubble["text"].split()  # every word shown, none cut
        tx0, ty0, tx1, ty1 = bubble["text_box"]
        assert inside(bubble["text_box"], bubble["box"])
        glyphs = glyph_boxes(font, bubble)
        ink = np.zeros(page.shape[:2], dtype=bool)
        for g in glyphs:
            assert tx0 <= g[0] and ty0 <= g[1] and g[2] <= tx1 and g[3] <= ty1, (g, bubble["text_box"])
            ink[math.floor(g[1]):math.ceil(g[3]), math.floor(g[0]):math.ceil(g[2])] = True
        # the text box is the bubble's inside: its fill wherever there is no glyph (no outline, no panel
        # showing through), and dark text inside the glyph boxes
        region = page[ty0:ty1, tx0:tx1]
        free = ~ink[ty0:ty1, tx0:tx1]
        assert (region[free] == fill).all(), kind
        assert (region[~free].max(axis=-1) < 80).sum() > 20 * len(bubble["lines"])


def blob(size, cx, cy, r):
    """A soft round mask (0..1) centred at (cx, cy), radius r, on a size x size grid."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (1 - ((x - cx) ** 2 + (y - cy) ** 2).sqrt() / (2 * r)).clamp(0, 1)


def test_bubbles_avoid_the_characters_and_tails_end_on_the_speaker(B, L, P):
    # panel 1: Ann's head fills the top left, Bob's the top right; panel 2: only Bob, off centre
    story = P.parse_story("[Ann] a woman\n[Bob] a man\n---\n[Ann] and [Bob] talk\n> Ann: Hello Bob, nice hat.\n"
                          "> Bob: Thank you!\n> Ann (thought): It is ugly.\n[Bob] alone\n> Bob (shout): Hey!\n"
                          "> Bob (whisper): anyone?\n")
    size = 64
    rows = torch.zeros(4, size, size)
    rows[0] = blob(size, 16, 14, 12)  # panel 0, Ann
    rows[1] = blob(size, 48, 14, 12)  # panel 0, Bob
    rows[3] = blob(size, 40, 40, 14)  # panel 1, Bob
    spec = grid(L, n=2, cell=300)
    _, layout, bubble_masks = B.compose_comic(panels(2), spec, story=story, character_masks=rows)
    bubbles = json.loads(layout)
    _, plain_layout, _ = B.compose_comic(panels(2), spec, story=story)
    boxes = panel_boxes(L, spec, 2)
    names = ("Ann", "Bob")

    def region(panel, name):
        """The character's region (mask >= 0.5) on the page: square panels are only scaled."""
        x0, y0, x1, y1 = boxes[panel]
        m = rows[panel * 2 + names.index(name)]
        ys = ((torch.arange(y1 - y0) + 0.5) * size / (y1 - y0)).long()
        xs = ((torch.arange(x1 - x0) + 0.5) * size / (x1 - x0)).long()
        page = torch.zeros(spec.page_height, spec.page_width, dtype=torch.bool)
        page[y0:y1, x0:x1] = m[ys][:, xs] >= 0.5
        return page

    every = region(0, "Ann") | region(0, "Bob") | region(1, "Bob")
    assert not any(b["overflow"] for b in bubbles)
    # the bodies keep off every character; the tails end on the speaker
    for b in bubbles:
        x0, y0, x1, y1 = b["box"]
        assert not every[y0:y1, x0:x1].any(), b
        assert bubble_masks[0, y0:y1, x0:x1].float().mean() > 0.5
        tx, ty = b["tail"]
        assert region(b["panel"], b["speaker"])[ty, tx], (b["speaker"], b["tail"])
    # without the masks the same bubbles sit in the top band, over the heads: the masks moved them
    assert any(overlap(a["box"], (x, y, x + 1, y + 1)) for a in json.loads(plain_layout)
               for y, x in torch.nonzero(every).tolist()[::97])


def test_overflow_is_reported_and_drawn_inside_the_panel(B, L, P, caplog):
    long = " ".join(f"word{i}" for i in range(400))
    story = P.parse_story(f"[Ann] a woman\n---\n[Ann] talks\n> Ann: Fine.\n[Ann] talks more\n> Ann: {long}\n"
                          f"> Ann (shout): {long}\n")
    spec = grid(L, n=2, cell=160)
    caplog.set_level(logging.WARNING)
    _, layout, _ = B.compose_comic(panels(2), spec, story=story)
    bubbles = json.loads(layout)
    assert [b["overflow"] for b in bubbles] == [False, True, True]
    assert "panel 2 does not fit (story lines 6, 7)" in caplog.text and "panel 1 " not in caplog.text
    assert bubbles[1]["font_size"] == 6 and bubbles[1]["lines"][-1].endswith("...")
    boxes = panel_boxes(L, spec, 2)
    for b in bubbles[1:]:
        assert b["box"] is None or inside(b["box"], boxes[1])


def test_hostile_dialogue_is_bounded(B, L, P):
    huge = "x" * 50000 + " " + "漢字" * 5000
    lines = "\n".join(f"> Ann: line {i}" for i in range(300))
    story = P.parse_story(f"[Ann] a woman\n---\n[Ann] talks\n> Ann: {huge}\n{lines}\n[Ann] again\n> {huge}\n")
    spec = grid(L, n=2, cell=200)
    start = time.perf_counter()
    pages, layout, masks = B.compose_comic(panels(2), spec, story=story)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"{elapsed:.1f} s"  # about 1 s here; 25 s before placement measured lazily
    bubbles = json.loads(layout)
    assert len(bubbles) == 302 and all(b["overflow"] for b in (bubbles[0], bubbles[-1]))
    boxes = panel_boxes(L, spec, 2)
    for b in bubbles:
        assert b["box"] is None or inside(b["box"], boxes[b["panel"]])
        assert sum(map(len, b["lines"])) <= 2000  # cut to what a panel can show


def test_comic_font_is_preferred_for_bubbles(L, dejavu, tmp_path):
    # without fontconfig: a file named as a comic font in the font folders
    (tmp_path / "ComicNeue-Regular.ttf").symlink_to(dejavu)
    fonts = L.CaptionFonts(fc_match=None, folders=[str(tmp_path)], comic=True)
    assert fonts.face_for("Hello").path == str(tmp_path / "ComicNeue-Regular.ttf")
    assert L.CaptionFonts(fc_match=None, folders=[str(tmp_path)]).face_for("Hello").path is None  # captions: as before
    # with fontconfig: only a family that resolves to itself, never fc-match's substitute
    fake = tmp_path / "fc-match"
    for family, expected in (("DejaVu Sans", []), ("Comic Neue", [str(tmp_path / "c.ttf")])):
        fake.write_text(f"#!/bin/sh\nprintf '{family}\\t{tmp_path}/c.ttf\\t0'\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        assert [f.path for f in L.comic_fonts(str(fake), [])] == expected
    # the font in font_path still comes first
    assert L.CaptionFonts(dejavu, fc_match=None, folders=[str(tmp_path)], comic=True).face_for("Hi").path == dejavu


def test_comic_fonts_can_be_skipped(B, L, P, dejavu, monkeypatch):
    # compose_comic(comic=False), for pages that must look the same on every machine (template thumbnails):
    # bubbles lettered as where no comic font is installed, even where one is (a stand-in comic font here)
    story = P.parse_story("[Ann] a woman\n---\n[Ann] talks # Monday.\n> Ann: Hello there!\n> Ann (shout): HEY!\n")
    spec = grid(L, n=1)
    monkeypatch.setattr(L, "comic_fonts", lambda fc_match, folders: [])
    bare = B.compose_comic(panels(1), spec, story=story)
    monkeypatch.setattr(L, "comic_fonts", lambda fc_match, folders: [L.FontFile(dejavu)])
    comic = B.compose_comic(panels(1), spec, story=story)
    plain = B.compose_comic(panels(1), spec, story=story, comic=False)
    assert not torch.equal(comic[0], bare[0])
    assert torch.equal(plain[0], bare[0]) and plain[1] == bare[1] and torch.equal(plain[2], bare[2])


def test_errors(B, L, P, errors, host):
    story = P.parse_story("[Ann] a woman\n[Bob] a man\n---\n[Ann] talks\n> Ann: Hi\n[Bob] listens\n")
    spec = grid(L, n=2)
    with pytest.raises(errors.NodeInputError, match=r"SDN_ComicLayout: input 'story': expected the story of these 3 "
                                                    r"panel images.*a story of 2 panels"):
        B.compose_comic(panels(3), spec, story=story)
    with pytest.raises(errors.NodeInputError, match=r"input 'character_masks': expected the story input connected"):
        B.compose_comic(panels(2), spec, character_masks=torch.zeros(4, 8, 8))
    with pytest.raises(errors.NodeInputError, match=r"input 'character_masks': expected a MASK of 2 panels x 2 "
                                                    r"characters rows.*got \(3, 8, 8\)"):
        B.compose_comic(panels(2), spec, story=story, character_masks=torch.zeros(3, 8, 8))
    no_font = P.parse_story("[Ann] a woman\n---\n[Ann] talks\n[Ann] reads\n> Ann: \U00010600\U0001D2E0\n")
    if not L.CaptionFonts(comic=True)._find("\U00010600\U0001D2E0")[0]:
        with pytest.raises(errors.NodeInputError, match=r"input 'story': .*panel 2, line 5 with .*U\+10600"):
            B.compose_comic(panels(2), spec, story=no_font)
    # the node: captions that contradict the connected story
    layout = host.node_class("SDN_ComicLayout")
    args = dict(images=panels(2), layout="strip", reading_direction="left-to-right", page_width=432, page_height=216,
                rows=1, columns=2, gutter=8, border_width=3, border_color="#000", background_color="#fff",
                caption_font_size=16)
    with pytest.raises(errors.NodeInputError, match=r"input 'captions': expected empty, or the connected story's"):
        layout.execute(**args, captions="one\ntwo", story=story)
    out = layout.execute(**args, captions="\n", story=story)  # SDN_StoryPrompt's captions of this story
    assert out.result[0].shape == (1, 216, 432, 3) and json.loads(out.result[1])[0]["text"] == "Hi"
    assert out.result[2].shape == (1, 216, 432)


def test_example_page_is_what_the_script_draws():
    # the README's page: re-drawn by scripts/make_dialogue_page.py and compared with the committed PNG, with
    # room for other fonts (a comic font installed elsewhere) and the PNG's palette, not for other panels or order
    import importlib.util
    from pathlib import Path

    from PIL import Image

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("make_dialogue_page", repo / "scripts" / "make_dialogue_page.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    drawn, png = script.draw_example(), repo / "docs" / "dialogue_page.png"
    committed = Image.open(png).convert("RGB")
    assert png.stat().st_size < 300_000 and drawn.size == committed.size
    # at 1/16 scale: 1.5 here, 11 with DejaVu Sans instead of Pillow's font, 27 with the second page left to right
    small = lambda img: np.asarray(img.resize((img.width // 16, img.height // 16), Image.Resampling.BOX), np.float32)  # noqa: E731
    assert np.abs(small(drawn) - small(committed)).max(-1).mean() < 18
