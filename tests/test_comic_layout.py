"""Comic layout: page counts and sizes, panel placement (incl. right-to-left), partial pages, captions, errors.

Expected cell positions are computed here from the documented geometry (gutter around every cell, equal integer
splits), independently of story/layout.py.
"""
import math

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
        L.load_font(str(bad), 12)


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
