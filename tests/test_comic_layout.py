"""Comic layout: page counts and sizes, panel placement (incl. right-to-left), partial pages, captions, errors.

Expected cell positions are computed here from the documented geometry (gutter around every cell, equal integer
splits), independently of story/layout.py.
"""
import glob
import math
import os
import shutil
import subprocess
import time

import pytest
import torch

COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
          (128, 0, 0), (0, 0, 128)]
BG = (255, 255, 255)


@pytest.fixture(scope="module")
def L(pack):
    return pack("story.layout")


@pytest.fixture(scope="module")
def errors(pack):
    return pack("errors")


def solid_panels(n, h=40, w=56):
    out = torch.empty(n, h, w, 3)
    for i in range(n):
        out[i] = torch.tensor(COLORS[i]) / 255.0
    return out


def px(page, x, y):
    return tuple(int(round(v * 255)) for v in page[y, x].tolist())


def expected_centres(width, height, gutter, counts, rtl=False):
    """Centres of cells in reading order, from the documented geometry."""
    def split(total, n):
        size = (total - gutter * (n + 1)) / n
        return [gutter + i * (size + gutter) + size / 2 for i in range(n)]
    centres = []
    for y, n in zip(split(height, len(counts)), counts):
        xs = split(width, n)
        if rtl:
            xs = xs[::-1]
        centres += [(int(x), int(y)) for x in xs]
    return centres


def spec(L, **kw):
    base = dict(page_width=400, page_height=300, gutter=10, border_width=3, background_color="#FFFFFF",
                border_color="#000000")
    base.update(kw)
    return L.LayoutSpec(**base)


@pytest.mark.parametrize("layout,kw,counts", [
    ("grid", dict(rows=2, columns=3), [3, 3]),
    ("four panel", dict(rows=5, columns=5), [2, 2]),
    ("classic", dict(rows=3), [1, 2, 3]),
    ("strip", dict(columns=4), [4]),
])
@pytest.mark.parametrize("direction", ["left-to-right", "right-to-left"])
def test_pages_and_placement(L, layout, kw, counts, direction):
    per_page = sum(counts)
    n = per_page + 2  # one full page and a partial one
    s = spec(L, layout=layout, reading_direction=direction, **kw)
    pages = L.compose_pages(solid_panels(n), s)
    assert pages.shape == (math.ceil(n / per_page), 300, 400, 3)
    assert pages.dtype == torch.float32 and 0 <= pages.min() and pages.max() <= 1
    centres = expected_centres(400, 300, 10, counts, rtl=direction == "right-to-left")
    for i in range(n):
        page, k = divmod(i, per_page)
        x, y = centres[k]
        assert px(pages[page], x, y) == COLORS[i], (layout, direction, i)
    # empty cells on the last page show background, not a border or stale panel
    for k in range(n - per_page, per_page):
        x, y = centres[k]
        assert px(pages[-1], x, y) == BG, (layout, k)
    # gutter at the page corner is background
    assert px(pages[0], 2, 2) == BG


def test_rtl_reverses_order_not_pixels(L):
    # a panel with a left half red and right half blue keeps red on the left in right-to-left mode
    img = torch.zeros(2, 40, 40, 3)
    img[:, :, :20, 0] = 1.0
    img[:, :, 20:, 2] = 1.0
    img[1] *= 0.5
    pages = L.compose_pages(img, spec(L, layout="strip", columns=2, reading_direction="right-to-left",
                                        page_height=200))
    (lx, cy), (rx, _) = expected_centres(400, 200, 10, [2])[::-1][0], expected_centres(400, 200, 10, [2])[::-1][1]
    # first panel (full intensity) sits in the RIGHT cell
    cell_w = (400 - 30) / 2
    right_cell_x0 = int(10 + cell_w + 10)
    assert px(pages[0], right_cell_x0 + 10, 100) == (255, 0, 0)
    assert px(pages[0], int(right_cell_x0 + cell_w - 10), 100) == (0, 0, 255)
    assert px(pages[0], 20, 100) == (128, 0, 0)


def test_border_color_drawn(L):
    pages = L.compose_pages(solid_panels(1), spec(L, layout="four panel", border_width=4, border_color="#00FF00"))
    # cell 0 starts at (10, 10): its first 4 pixel rows/columns are border
    assert px(pages[0], 11, 50) == (0, 255, 0)
    assert px(pages[0], 50, 12) == (0, 255, 0)
    assert px(pages[0], 15, 50) == COLORS[0]


def test_center_crop_keeps_aspect(L):
    # a wide panel: left/right thirds green, centre third red; the cell is square-ish so centre shows red
    img = torch.zeros(1, 30, 300, 3)
    img[..., 1] = 1.0
    img[:, :, 100:200, 1] = 0
    img[:, :, 100:200, 0] = 1.0
    pages = L.compose_pages(img, spec(L, layout="grid", rows=1, columns=1, page_width=200, page_height=200,
                                      border_width=0))
    page = pages[0]
    row = [px(page, x, 100) for x in range(12, 188)]
    assert all(p == (255, 0, 0) for p in row[5:-5]), "centre-crop should keep only the middle third (red)"


def test_any_panel_size_and_gray(L):
    gray = torch.full((3, 17, 23, 1), 0.5)
    pages = L.compose_pages(gray, spec(L, layout="four panel"))
    assert pages.shape == (1, 300, 400, 3)
    x, y = expected_centres(400, 300, 10, [2, 2])[2]
    assert px(pages[0], x, y) == (128, 128, 128)


def caption_box_rows(base, captioned, box):
    """Rows inside the panel box where the captioned render differs from the plain one."""
    x0, y0, x1, y1 = box
    diff = (base[y0:y1, x0:x1] - captioned[y0:y1, x0:x1]).abs().amax(dim=(1, 2))
    return torch.nonzero(diff > 1e-6).flatten()


def test_caption_drawn_at_bottom_inside_panel(L):
    s = spec(L, layout="four panel", caption_font_size=14)
    panels = solid_panels(4)
    plain = L.compose_pages(panels, s)[0]
    captioned = L.compose_pages(panels, s, ["", "A short caption", "", ""])[0]
    cells = L.cell_boxes(s)
    box = L.panel_box(cells[1], s.border_width)
    rows = caption_box_rows(plain, captioned, box)
    assert len(rows) > 0, "caption not drawn"
    h = box[3] - box[1]
    assert rows.min() >= h // 2 and rows.max() == h - 1, "caption box should sit at the panel bottom"
    # outside panel 1 nothing changed
    mask = torch.ones(300, 400, dtype=torch.bool)
    mask[box[1]:box[3], box[0]:box[2]] = False
    assert torch.equal(plain[mask], captioned[mask])
    # the box is translucent: the panel colour tints it (not pure white), and dark text pixels exist
    region = captioned[box[3] - 3, box[0]:box[2]]
    assert not torch.allclose(region, torch.ones_like(region))
    inner = captioned[box[1] + rows.min():box[3], box[0]:box[2]]
    assert (inner.mean(-1) < 0.3).any(), "no dark text pixels"


def test_long_caption_wraps_inside_panel(L):
    s = spec(L, layout="grid", rows=1, columns=4, page_width=400, page_height=300, caption_font_size=20)
    text = "This is a rather long caption that must wrap over several lines " \
           "and a Supercalifragilisticexpialidociouslylongword too"
    panels = solid_panels(4)
    plain = L.compose_pages(panels, s)[0]
    captioned = L.compose_pages(panels, s, [text] * 4)[0]
    for cell in L.cell_boxes(s):
        box = L.panel_box(cell, s.border_width)
        font, lines, line_h, pad = L.layout_caption(text, box[2] - box[0], box[3] - box[1], s)
        assert len(lines) > 1
        assert all(font.getlength(l) <= box[2] - box[0] - 2 * pad for l in lines)
        # text words are all kept unless truncated with an ellipsis
        joined = "".join(lines).replace(" ", "")
        assert joined == text.replace(" ", "") or lines[-1].endswith("...")
    # nothing outside the panel boxes changed
    mask = torch.ones(300, 400, dtype=torch.bool)
    for cell in L.cell_boxes(s):
        b = L.panel_box(cell, s.border_width)
        mask[b[1]:b[3], b[0]:b[2]] = False
    assert torch.equal(plain[mask], captioned[mask])


def test_huge_caption_font_shrinks_or_truncates(L):
    s = spec(L, layout="four panel", caption_font_size=200)
    font, lines, line_h, pad = L.layout_caption("word " * 200, 150, 100, s)
    assert len(lines) * line_h + 2 * pad <= 50
    assert all(font.getlength(l) <= 150 - 2 * pad for l in lines)


def test_bad_font_path(L, errors, tmp_path):
    s = spec(L, font_path=str(tmp_path / "missing.ttf"))
    with pytest.raises(errors.NodeInputError, match="font_path"):
        L.compose_pages(solid_panels(1), s, ["hello"])
    bad = tmp_path / "bad.ttf"
    bad.write_bytes(b"not a font")
    with pytest.raises(errors.NodeInputError, match="font_path"):
        L.compose_pages(solid_panels(1), spec(L, font_path=str(bad)), ["hello"])


def test_bad_settings(L, errors):
    with pytest.raises(errors.NodeInputError, match="background_color"):
        L.compose_pages(solid_panels(1), spec(L, background_color="nope"))
    with pytest.raises(errors.NodeInputError, match="captions"):
        L.compose_pages(solid_panels(1), spec(L), ["a", "b"])
    with pytest.raises(errors.NodeInputError, match="page_"):
        L.compose_pages(solid_panels(1), spec(L, layout="grid", rows=30, columns=1, page_height=300, gutter=10))


def run_expect_error(host, prompt, caplog, pattern):
    """Run ``prompt`` through the executor, expect it to fail and the node's exception message to match.

    ComfyUI only forwards execution_error to a connected client, so the host's WorkflowError may not carry the
    message yet; ComfyUI also logs the exception ("!!! Exception during processing !!!"), which is checked too.
    """
    import re
    import sdn_host
    caplog.clear()
    with pytest.raises(sdn_host.WorkflowError) as info:
        host.run(prompt)
    text = str(info.value) + "\n" + caplog.text
    assert re.search(pattern, text), text[-2000:]
    return text


def test_node_through_executor(host, caplog):
    # a 5-panel batch from core EmptyImage nodes batched together, laid out as four panel with captions
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 5, "color": 0xFF0000}},
        "2": {"class_type": "SDN_ComicLayout", "inputs": {
            "images": ["1", 0], "layout": "four panel", "reading_direction": "right-to-left",
            "page_width": 256, "page_height": 200, "rows": 3, "columns": 2, "gutter": 8, "border_width": 2,
            "border_color": "#000000", "background_color": "#0000FF", "caption_font_size": 12,
            "font_path": "", "captions": "one\n\ntwo\n\n\n"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    pages = host.run(prompt).node_output("2", 0)
    assert pages.shape == (2, 200, 256, 3)
    centres = expected_centres(256, 200, 8, [2, 2], rtl=True)
    assert px(pages[1], *centres[0]) == (255, 0, 0)
    assert px(pages[1], *centres[1]) == (0, 0, 255)

    bad = dict(prompt)
    bad["2"] = {"class_type": "SDN_ComicLayout", "inputs": dict(prompt["2"]["inputs"], font_path="/nonexistent/x.ttf")}
    run_expect_error(host, bad, caplog, r"SDN_ComicLayout: input 'font_path': expected a readable")


# ---- captions in any script -------------------------------------------------------------------------------
# Fonts and libraries below are installed by scripts/setup_test_env.sh (as root on Debian): fonts-wqy-microhei
# (CJK), fonts-dejavu-core (Latin, Hebrew, Arabic), libfribidi0 (Pillow's raqm layout). Without them these tests
# skip, or fail when CI is set.

NO_FONT_HAS = "\U00010600\U0001D2E0"  # Linear A, Mayan numeral: in none of the fonts the tests install
FONT_DIRS = ["/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"),
             os.path.expanduser("~/.local/share/fonts")]


def require(ok, what):
    if not ok:
        message = f"{what} is missing: run scripts/setup_test_env.sh as root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def installed_font(name):
    found = [p for d in FONT_DIRS for p in glob.glob(os.path.join(d, "**", name), recursive=True)]
    require(found, f"the font file {name}")
    return found[0]


@pytest.fixture(scope="module")
def cjk_font():
    return installed_font("wqy-microhei.ttc")


@pytest.fixture(scope="module")
def dejavu():
    return installed_font("DejaVuSans.ttf")


@pytest.fixture(scope="module")
def raqm():
    from PIL import features
    require(features.check_feature("raqm"), "Pillow's raqm layout (libfribidi0)")


CJK_600 = "".join(chr(0x4E00 + (i * 131) % 20000) for i in range(600))


def test_600_char_cjk_caption_wraps_in_linear_time(L, cjk_font):
    # No spaces: every line is broken between characters. Re-measuring every shorter prefix took ~14 s here.
    s = spec(L, caption_font_size=48)
    start = time.perf_counter()
    font, lines, line_h, pad = L.layout_caption(CJK_600, 484, 450, s)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{elapsed:.2f} s for a 600-character caption (about 0.15 s expected)"
    width = 484 - 2 * pad
    assert len(lines) > 3 and all(font.getlength(l) <= width for l in lines)
    joined = "".join(lines)
    assert joined == CJK_600 or (lines[-1].endswith("...") and CJK_600.startswith(joined[:-3]))
    # lines are full: a line ends only where the next character no longer fits
    for line, nxt in zip(lines, lines[1:-1]):
        assert font.getlength(line + nxt[0]) > width


def test_cjk_punctuation_never_starts_a_line(L, cjk_font):
    # exactly 7 characters fit a line and every 8th is a full stop: greedy breaking would start lines with it
    text = "今天我们去公园。" * 6
    font, lines, _, pad = L.layout_caption(text, 150, 2000, spec(L, caption_font_size=20, font_path=cjk_font))
    assert font.getlength(text[:7]) <= 150 - 2 * pad < font.getlength(text[:8])
    assert len(lines) > 3 and "".join(lines) == text
    assert not any(l.startswith("。") for l in lines), lines


def caption_inks(L, s, captions):
    """Per panel, the dark (text) pixels of the bottom half of the panel box; white panels."""
    pages = L.compose_pages(torch.ones(len(captions), 64, 64, 3), s, captions)
    out = []
    for cell in L.cell_boxes(s)[:len(captions)]:
        x0, y0, x1, y1 = L.panel_box(cell, s.border_width)
        out.append(pages[0, (y0 + y1) // 2:y1, x0:x1].mean(-1) < 0.5)
    return out


def strip(L, n, **kw):
    # n equal cells of 180 px
    return spec(L, layout="strip", columns=n, page_width=n * 180 + (n + 1) * 10, page_height=220, border_width=0,
                caption_font_size=40, **kw)


def test_cjk_caption_drawn_in_a_covering_system_font(L, cjk_font):
    chars = "中文字"
    inks = caption_inks(L, strip(L, 3), list(chars))
    assert all(ink.sum() > 50 for ink in inks)
    # three different glyphs, not three copies of the same box
    for a in range(3):
        for b in range(a + 1, 3):
            assert (inks[a] ^ inks[b]).sum() > 0.2 * inks[a].sum(), (chars[a], chars[b])
    font = L.layout_caption(chars, 180, 180, strip(L, 3))[0]
    assert isinstance(font.path, str) and os.path.exists(font.path)
    if shutil.which("fc-list"):  # fontconfig agrees that the chosen file has these characters
        listed = subprocess.run(["fc-list", ":charset=4e2d 6587 5b57", "file"], capture_output=True, text=True).stdout
        assert os.path.realpath(font.path) in {os.path.realpath(l.rstrip(":")) for l in listed.split()}


def test_one_font_for_all_captions_when_one_has_them_all(L, cjk_font):
    fonts = L.CaptionFonts()
    fonts.pick(["Hello", "", "你好"])
    assert fonts.face_for("Hello") == fonts.face_for("你好") and fonts.face_for("Hello").path is not None


def skip_if_a_font_has(chars):
    for c in chars:
        if shutil.which("fc-list") and subprocess.run(["fc-list", f":charset={ord(c):x}"], capture_output=True,
                                                      text=True).stdout.strip():
            pytest.skip(f"an installed font has {c!r}")


def test_node_reports_characters_no_font_has(host, caplog):
    skip_if_a_font_has(NO_FONT_HAS)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0xFF0000}},
        "2": {"class_type": "SDN_ComicLayout", "inputs": {
            "images": ["1", 0], "layout": "strip", "reading_direction": "left-to-right",
            "page_width": 256, "page_height": 200, "rows": 1, "columns": 2, "gutter": 8, "border_width": 2,
            "border_color": "#000000", "background_color": "#FFFFFF", "caption_font_size": 12,
            "font_path": "", "captions": f"one\n{NO_FONT_HAS}"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    run_expect_error(host, prompt, caplog, r"SDN_ComicLayout: input 'captions': .*caption 2 with .*U\+10600 U\+1D2E0")


def test_caption_no_font_can_draw_is_an_error(L, errors, cjk_font):
    skip_if_a_font_has(NO_FONT_HAS)
    with pytest.raises(errors.NodeInputError) as info:
        L.compose_pages(solid_panels(2), spec(L), ["fine", f"Hi {NO_FONT_HAS} 中"])
    message = str(info.value)
    assert "SDN_ComicLayout: input 'captions'" in message and "caption 2" in message
    assert repr(NO_FONT_HAS) in message and "U+10600 U+1D2E0" in message


def test_font_lookup_without_fontconfig(L, errors, tmp_path, cjk_font, dejavu):
    # fontconfig absent: the standard font folders are scanned
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "DejaVuSans.ttf").symlink_to(dejavu)
    (tmp_path / "cjk").mkdir()
    (tmp_path / "cjk" / "wqy-microhei.ttc").symlink_to(cjk_font)
    face = L.CaptionFonts(fc_match=None, folders=[str(tmp_path)]).face_for("中文 and ASCII")
    assert face.path == str(tmp_path / "cjk" / "wqy-microhei.ttc")
    with pytest.raises(errors.NodeInputError, match=r"caption 1 with '中文' \(U\+4E2D U\+6587\)"):
        L.CaptionFonts(fc_match=None, folders=[str(tmp_path / "latin")]).face_for("中文 and ASCII")
    # nothing installed at all: only Pillow's default font, which has no CJK
    with pytest.raises(errors.NodeInputError, match="captions"):
        L.CaptionFonts(fc_match=None, folders=[]).face_for("中文")


def test_font_path_is_honoured(L, dejavu, cjk_font, caplog):
    s = spec(L, font_path=dejavu)
    assert L.layout_caption("Plain text", 180, 180, s)[0].path == dejavu
    plain = caption_inks(L, strip(L, 1), ["Plain text"])[0]
    assert not torch.equal(plain, caption_inks(L, strip(L, 1, font_path=dejavu), ["Plain text"])[0])
    # a caption the font in font_path cannot draw falls back to one that can, and says so
    caplog.clear()
    font = L.layout_caption("中文", 180, 180, s)[0]
    assert os.path.realpath(font.path) == os.path.realpath(cjk_font)
    assert "font_path lacks '中文'" in caplog.text
    # ... for those captions only
    fonts = L.CaptionFonts(dejavu)
    fonts.pick(["Plain text", "中文"])
    assert fonts.face_for("Plain text").path == dejavu and fonts.face_for("中文").path != dejavu


@pytest.mark.parametrize("word", ["אב", "دو"], ids=["hebrew", "arabic"])
def test_rtl_caption_reads_right_to_left(L, raqm, dejavu, word):
    # the word and each of its letters alone, in panels of equal size; right-to-left captions are right-aligned,
    # so the word's FIRST letter must sit where the first letter alone sits (the right end)
    word_ink, first, second = caption_inks(L, strip(L, 3), [word, word[0], word[1]])

    def overlap(letter):
        return (word_ink & letter).sum().item() / letter.sum().item()

    assert overlap(first) > 0.9 and overlap(second) < 0.6, (overlap(first), overlap(second))
    cols = torch.nonzero(word_ink.any(0)).flatten()
    assert cols.max() > word_ink.shape[1] * 0.8, "right-to-left caption should be right-aligned"


def test_arabic_is_shaped(L, raqm, dejavu):
    # three joined behs: initial, medial and final forms make one unbroken stroke, narrower than two isolated
    # behs; unshaped isolated forms side by side leave gaps and take three times the width
    word, letter = caption_inks(L, strip(L, 2), ["ببب", "ب"])

    def ink_columns(ink):
        cols = ink.any(0)
        idx = torch.nonzero(cols).flatten()
        return cols[idx.min():idx.max() + 1]

    assert ink_columns(word).all(), "gaps between the letters: not joined"
    assert len(ink_columns(word)) < 2 * len(ink_columns(letter))


def test_rtl_without_raqm_is_an_error(L, errors, monkeypatch):
    from PIL import features
    real = features.check_feature
    monkeypatch.setattr(features, "check_feature", lambda name: False if name == "raqm" else real(name))
    with pytest.raises(errors.NodeInputError, match=r"input 'captions': expected right-to-left text only where "
                                                    r"Pillow has its raqm layout.*caption 1 with 'שלום'"):
        L.compose_pages(solid_panels(1), spec(L), ["שלום"])
