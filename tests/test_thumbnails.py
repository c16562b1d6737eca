"""Template-browser thumbnails (workflows/<name>.jpg, drawn by scripts/make_thumbnails.py from real photos in the
pack's own comic layout): one per workflow and none without one, valid JPEGs of the thumbnail size, equal to a
fresh drawing (the recipe exactly, the pixels within a tolerance for fonts), and a script that never replaces a
thumbnail without --overwrite; a comic with dialogue is the real SDN_ComicLayout's page, bubbles included. The
script needs no ComfyUI (it imports story/layout.py, parser.py and bubbles.py alone); only the node test runs it.
"""
import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import make_thumbnails as mt

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def fresh():
    """{name: (image, recipe JSON)} drawn now from every shipped workflow."""
    return {name: mt.thumbnail(WORKFLOWS / f"{name}.json") for name in NAMES}


def test_every_workflow_has_a_thumbnail_and_every_thumbnail_a_workflow():
    thumbnails = sorted(p.stem for p in WORKFLOWS.glob("*.jpg"))
    assert NAMES and thumbnails == NAMES
    assert not [p.name for p in WORKFLOWS.iterdir() if p.suffix not in (".json", ".jpg")]


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_a_small_jpeg_of_the_drawn_size(name, fresh):
    path = WORKFLOWS / f"{name}.jpg"
    assert path.stat().st_size < mt.MAX_BYTES
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        assert max(img.size) == mt.LONG_SIDE and min(img.size) >= mt.LONG_SIDE // 2
        assert img.size == fresh[name][0].size


@pytest.mark.parametrize("name", NAMES)
def test_committed_thumbnail_equals_a_fresh_drawing(name, fresh):
    why = mt.stale(WORKFLOWS / f"{name}.jpg", *fresh[name])
    assert why is None, f"{name}.jpg is {why}: run python scripts/make_thumbnails.py {name} --overwrite"


def test_thumbnails_follow_the_workflow(fresh):
    """Each kind shows what its workflow makes: the layout node's settings and the story's captions, as many
    pictures as panels on the pages shown, a reference photo for PhotoMaker, frames for a transition."""
    for name in NAMES:
        workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
        recipe = json.loads(fresh[name][1])
        nodes = {n["type"]: n for n in workflow["nodes"]}
        if "SDN_TransitionEmbeds" in nodes:
            assert recipe["kind"] == "video"
            assert recipe["frames_per_transition"] == nodes["SDN_TransitionEmbeds"]["widgets_values"][0]
            if "SDN_StoryPrompt" in nodes:
                story = mt.parser.parse_story(nodes["SDN_StoryPrompt"]["widgets_values"][0])
                assert [k["caption"] for k in recipe["keyframes"]] == list(story.captions)
            continue
        layout = nodes["SDN_ComicLayout"]["widgets_values"]
        spec = recipe["spec"]
        assert [spec[k] for k in ("layout", "reading_direction", "rows", "columns")] == layout[:2] + layout[4:6]
        assert [spec["border_color"], spec["background_color"]] == layout[8:10]
        assert abs(spec["page_width"] / spec["page_height"] - layout[2] / layout[3]) < 0.01
        story = mt.parser.parse_story(nodes["SDN_StoryPrompt"]["widgets_values"][0])
        captions = [p["caption"] for p in recipe["panels"]]
        assert captions == list(story.captions[:len(captions)]) and all(captions)
        for panel, parsed in zip(recipe["panels"], story.panels):
            people = [photo for photo, _ in panel["shots"] if photo in dict(mt.CHARACTERS)]
            assert len(people) == len(parsed.characters)
        assert ("reference" in recipe) == ("PhotoMakerEncode" in nodes)
        # the layout node draws the story's dialogue as bubbles where the story is connected to it
        linked = any(i["name"] == "story" and i.get("link") is not None for i in nodes["SDN_ComicLayout"]["inputs"])
        for panel, parsed in zip(recipe["panels"], story.panels):
            assert panel.get("dialogue") == ([dataclasses.asdict(d) for d in parsed.dialogue] if linked else None)
            assert panel.get("characters") == (list(parsed.characters) if linked else None)
    two = json.loads(fresh["two_characters_sd15"][1])
    assert any(len(p["shots"]) == 2 for p in two["panels"])  # a panel with both characters
    comic = json.loads(fresh["comic_sd15"][1])  # bubbles of every kind and narration
    assert {d["kind"] for p in comic["panels"] for d in p["dialogue"]} == {"speech", "thought", "shout", "whisper",
                                                                          "narration"}
    long_story = json.loads(fresh["long_story_sd15"][1])
    assert len(long_story["panels"]) == 12  # two classic pages of 6


def test_photos_are_public_domain_or_cc0(fresh):
    import skimage.data

    used = {shot[0] for _, recipe in fresh.values() for shot in _shots(json.loads(recipe))}
    assert used <= set(mt.PHOTOS)
    for name in mt.PHOTOS:
        doc = inspect.getdoc(getattr(skimage.data, name))
        assert "public domain" in doc or "CC0" in doc, name


def _shots(recipe):
    for panel in recipe.get("panels", []) + recipe.get("keyframes", []) + [recipe.get("reference", {"shots": []})]:
        yield from panel["shots"]


def test_a_stale_thumbnail_is_found(tmp_path):
    """A changed story, layout setting or drawing makes the committed file stale; another font does not."""
    wf = tmp_path / "comic_sd15.json"
    shutil.copy(WORKFLOWS / wf.name, wf)
    img, comment = mt.thumbnail(wf)
    path = tmp_path / "comic_sd15.jpg"
    path.write_bytes(mt.encode(img, comment))
    assert mt.stale(path, img, comment) is None

    workflow = json.loads(wf.read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "SDN_StoryPrompt")
    story = node["widgets_values"][0]
    node["widgets_values"][0] = story.replace("# The end of the line.", "# Not the end.")
    wf.write_text(json.dumps(workflow))
    assert "recipe differs" in mt.stale(path, *mt.thumbnail(wf))
    node["widgets_values"][0] = story.replace("Of course it is.", "Of course.")  # a changed bubble
    wf.write_text(json.dumps(workflow))
    assert "recipe differs" in mt.stale(path, *mt.thumbnail(wf))

    recipe = json.loads(comment)
    recipe["spec"]["reading_direction"] = "right-to-left"  # drawn differently under the same recipe
    assert "drawn differently" in mt.stale(path, mt.draw(recipe), comment)
    recipe = json.loads(comment)
    for panel in recipe["panels"]:
        del panel["dialogue"], panel["characters"]  # the same page without its bubbles
    plain = mt.draw(recipe)
    assert "drawn differently" in mt.stale(path, plain, comment)
    # captions in another font are within the tolerance (bubbles would move around text of another size: the
    # script letters them in Pillow's font whatever fonts are installed)
    path.write_bytes(mt.encode(plain, comment))
    recipe["spec"]["font_path"] = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if Path(recipe["spec"]["font_path"]).exists():
        assert mt.stale(path, mt.draw(recipe), comment) is None


def test_the_script_never_replaces_a_thumbnail_without_overwrite(tmp_path, capsys):
    shutil.copy(WORKFLOWS / "comic_sd15.json", tmp_path)
    shutil.copy(WORKFLOWS / "transition_video.json", tmp_path)
    other = (WORKFLOWS / "long_story_sd15.jpg").read_bytes()
    path = tmp_path / "comic_sd15.jpg"
    path.write_bytes(other)
    folder = ["--workflows", str(tmp_path)]

    assert mt.main(folder) == 2  # writes the missing one, keeps the one that differs
    assert path.read_bytes() == other
    assert "comic_sd15.jpg" in capsys.readouterr().err
    assert mt.stale(tmp_path / "transition_video.jpg", *mt.thumbnail(tmp_path / "transition_video.json")) is None

    assert mt.main(folder + ["--check"]) == 1
    assert path.read_bytes() == other
    assert mt.main(folder + ["--overwrite", "comic_sd15"]) == 0
    assert mt.stale(path, *mt.thumbnail(tmp_path / "comic_sd15.json")) is None
    assert mt.main(folder + ["--check"]) == 0

    (tmp_path / "orphan.jpg").write_bytes(other)  # a thumbnail without its workflow
    assert mt.main(folder + ["--check"]) == 1
    assert "orphan.jpg: no workflow orphan.json" in capsys.readouterr().err


def test_comic_thumbnail_is_what_the_layout_node_draws(host):
    """A comic thumbnail's page is SDN_ComicLayout's own output (the real node) for the same panel pictures,
    settings and story: its captions and dialogue bubbles, none cut at thumbnail size."""
    import numpy as np

    if host.pack_module("story.layout").CaptionFonts(comic=True).comic:
        pytest.skip("a comic font is installed: the node letters bubbles in it, thumbnails in Pillow's font")

    workflow = json.loads((WORKFLOWS / "comic_sd15.json").read_text())
    recipe = mt.recipe(workflow, "comic_sd15")
    spec = recipe["spec"]
    size = max(spec["page_width"], spec["page_height"])
    images = mt._batch([mt._panel_image(p, size) for p in recipe["panels"]])
    text = next(n for n in workflow["nodes"] if n["type"] == "SDN_StoryPrompt")["widgets_values"][0]
    story = host.pack_module("story.parser").parse_story(text)
    assert len(story.panels) == len(recipe["panels"])  # one four-panel page: the whole story
    pages, bubble_layout, _ = host.node_class("SDN_ComicLayout").execute(images, **spec, story=story).result
    thumbnail = mt._pages(recipe["panels"], spec)
    assert len(thumbnail) == 1
    assert np.array_equal(np.asarray(thumbnail[0]), np.asarray(mt._pil(pages[0])))
    bubbles = json.loads(bubble_layout)
    assert len(bubbles) == 5 and not any(b["overflow"] for b in bubbles)
