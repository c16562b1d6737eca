"""Draw the README's example comic pages (docs/dialogue_page.png) with the pack's own layout code.

Two pages side by side, made from scikit-image's bundled photos (public domain) as panels: a left-to-right
page with captions and every bubble kind (speech, thought, shout, whisper, narration), and a right-to-left
(manga order) page. The stories use the SDN_StoryPrompt syntax with '>' dialogue lines; fonts are chosen as
SDN_ComicLayout chooses them (a comic font when one is installed, else Pillow's default). Needs Pillow, numpy,
torch and scikit-image (not ComfyUI). Usage: python scripts/make_dialogue_page.py [--out docs/dialogue_page.png]
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

PACK = Path(__file__).resolve().parent.parent
OUT = PACK / "docs" / "dialogue_page.png"
PAGE, GAP, COLORS = 512, 16, 128

LEFT_TO_RIGHT = """\
[Ann] an astronaut in an orange suit
[Tom] a tabby cat
---
[Ann] smiling in front of the flag # Houston, the day before.
> Ann: Tomorrow I fly to the Moon!
> Ann (thought): I hope Tom feeds himself.
[Tom] looking up, wide eyes
> Meanwhile, at home...
> Tom (shout): WHERE IS MY DINNER?
[NC] a cup of coffee on a saucer
> Ann: Last coffee on Earth.
> Tom (whisper): ...and no cat food.
[NC] the rocket on the launch pad at night # Launch.
> Ann: Three... two... one...
"""

RIGHT_TO_LEFT = """\
[Ann] an astronaut in an orange suit
---
[NC] galaxies in deep space # Day 3.
> Far from home, the stars never set.
[NC] the Moon
> The Moon, at last.
[Ann] smiling # Day 4.
> Ann: Tom, I can see our house from here!
> Ann (thought): I hope he found the cat food.
"""


def load_pack():
    """The pack's modules without running its __init__ (which needs ComfyUI); never puts the pack root on
    sys.path (its nodes/ would shadow ComfyUI's nodes.py)."""
    package = types.ModuleType("sdn_example_pack")
    package.__path__ = [str(PACK)]
    sys.modules[package.__name__] = package
    return (importlib.import_module(f"{package.__name__}.story.{name}") for name in ("bubbles", "layout", "parser"))


def photos(names: list[str], size: int = 384):
    """scikit-image's photos, square-cropped, as an IMAGE batch (n, size, size, 3) float in 0..1."""
    import torch
    from skimage import data

    out = []
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        side = min(img.size)
        img = img.crop(((img.width - side) // 2, (img.height - side) // 2, (img.width + side) // 2,
                        (img.height + side) // 2)).resize((size, size), Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.array(img, dtype=np.float32) / 255.0))
    return torch.stack(out)


def draw_example() -> Image.Image:
    """Both pages side by side on a white sheet: RGB, (2 x PAGE + 3 x GAP) x (PAGE + 2 x GAP) px."""
    bubbles, layout, parser = load_pack()
    sheet = Image.new("RGB", (2 * PAGE + 3 * GAP, PAGE + 2 * GAP), "white")
    for k, (story, names, direction) in enumerate((
            (LEFT_TO_RIGHT, ["astronaut", "chelsea", "coffee", "rocket"], "left-to-right"),
            (RIGHT_TO_LEFT, ["hubble_deep_field", "moon", "astronaut"], "right-to-left"))):
        spec = layout.LayoutSpec(layout="four panel" if k == 0 else "classic", rows=2, reading_direction=direction,
                                 page_width=PAGE, page_height=PAGE, gutter=10, border_width=3, caption_font_size=20)
        pages, _, _ = bubbles.compose_comic(photos(names), spec, story=parser.parse_story(story))
        page = Image.fromarray((pages[0].numpy() * 255 + 0.5).astype(np.uint8))
        sheet.paste(page, (GAP + k * (PAGE + GAP), GAP))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # a 128-colour palette keeps the PNG small (under 300 KB) for the README
    draw_example().quantize(COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
