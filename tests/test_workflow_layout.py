"""The shipped workflows open readable without rearranging: no node covers another, and the story box is big
enough to show the whole story. Read from the saved positions and sizes; tests/test_frontend.py measures the
same in the real frontend (its own bounding boxes and text boxes).
"""
import json
import textwrap
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its pos (LiteGraph.NODE_TITLE_HEIGHT)

# Story Prompt as the pinned frontend (1.32.9) draws it, measured there: its two text boxes (story, negative)
# share the height left by 5 output rows (106 px) and the style combo (24 px), each with 20 px of margin;
# text in 10 px monospace (DejaVu Sans Mono: 6.02 px per character, 11 px per line), 2 px padding, and the
# box is 20 px narrower than the node.
FIXED_HEIGHT, BOX_MARGIN, BOX_INSET, PADDING, CHAR_WIDTH, LINE_HEIGHT = 130, 20, 20, 2, 6.02, 11


def rectangles(workflow):
    """{node id: (x0, y0, x1, y1)}: the node's body plus its title bar, in canvas pixels."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in workflow["nodes"]}


def overlaps(rects):
    """Pairs of node ids whose rectangles share area (touching edges is fine)."""
    items = sorted(rects.items())
    return [(a, b) for i, (a, ra) in enumerate(items) for b, rb in items[i + 1:]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]]


def story_height_needed(text, width):
    """Node height at which the story box of a Story Prompt ``width`` px wide shows ``text`` without scrolling."""
    columns = int((width - BOX_INSET - 2 * PADDING) // CHAR_WIDTH)
    lines = sum(len(textwrap.wrap(line, columns, break_on_hyphens=False)) or 1 for line in text.split("\n"))
    box = lines * LINE_HEIGHT + 2 * PADDING
    return FIXED_HEIGHT + 2 * (box + BOX_MARGIN)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_node_covers_another(path):
    workflow = json.loads(path.read_text())
    types = {n["id"]: f"{n['type']} {n.get('title', '')}".strip() for n in workflow["nodes"]}
    assert not [(types[a], types[b]) for a, b in overlaps(rectangles(workflow))]


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if "SDN_StoryPrompt" in p.read_text()], ids=lambda p: p.name)
def test_story_box_shows_the_whole_story(path):
    (node,) = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "SDN_StoryPrompt"]
    width, height = node["size"]
    assert height >= story_height_needed(node["widgets_values"][0], width), f"Story Prompt {width}x{height}"


def test_overlap_check_sees_a_covered_node():
    workflow = {"nodes": [{"id": 1, "pos": [0, 0], "size": [100, 100]}, {"id": 2, "pos": [0, 120], "size": [100, 50]},
                          {"id": 3, "pos": [100, 0], "size": [50, 50]}]}
    assert overlaps(rectangles(workflow)) == [(1, 2)]  # 2's title bar covers 1's bottom; 3 only touches 1
