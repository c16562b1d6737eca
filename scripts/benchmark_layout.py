"""Benchmark: caption layout time per caption, by script and caption length.

One caption in a panel of the default page (SDN_ComicLayout's defaults: 1024 x 1448 classic page, a panel of
the two-panel row, caption font size 24). Columns:
  script, chars  the caption's script and length (sample sentences repeated; CJK has no spaces)
  font           the file chosen for it (font_path empty: Pillow's default font, else an installed font)
  px, lines      the font size it was shrunk to so it takes at most half the panel, and its line count
  first ms       font choice (coverage probes, fontconfig) + wrapping + drawing, as one node call does it
  again ms       wrapping + drawing with the font already chosen (best of --repeats)
Needs only Pillow, numpy and torch (not ComfyUI). Usage: python scripts/benchmark_layout.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import PIL
from PIL import Image, features

from pack_modules import pack_module

SAMPLES = {
    "Latin": "The girl walked down the rainy street and found a tiny bookshop that was on no map. ",
    "CJK": "月光洒在安静的小镇上，她提着灯笼走过石桥，远处传来钟声。",
    "Hebrew": "הילדה הלכה ברחוב הגשום ומצאה חנות ספרים קטנה שלא הופיעה באף מפה. ",
    "Arabic": "مشت الفتاة في الشارع الممطر ووجدت مكتبة صغيرة لم تكن على أي خريطة. ",
}
LENGTHS = (50, 150, 600, 2000)


def caption(script: str, n: int) -> str:
    text = SAMPLES[script] * (n // len(SAMPLES[script]) + 1)
    return text[:n].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    L = pack_module("story.layout")
    spec = L.LayoutSpec()
    x0, y0, x1, y1 = L.panel_box(L.cell_boxes(spec)[1], spec.border_width)
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, Pillow "
          f"{PIL.__version__}, raqm {features.check_feature('raqm')}; panel {x1 - x0} x {y1 - y0} px")
    print(f"{'script':8}{'chars':>7}  {'font':24}{'px':>4}{'lines':>6}{'first ms':>10}{'again ms':>10}")
    for script in SAMPLES:
        for n in LENGTHS:
            text = caption(script, n)
            panel = Image.new("RGB", (x1, y1), "white")
            start = time.perf_counter()
            try:
                fonts = L.CaptionFonts(spec.font_path)
                fonts.pick([text])
                L._draw_caption(panel, (x0, y0, x1, y1), text, spec, fonts)
            except L.NodeInputError as exc:
                print(f"{script:8}{n:>7}  no font: {exc.got}")
                continue
            first = time.perf_counter() - start
            again = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                L._draw_caption(panel, (x0, y0, x1, y1), text, spec, fonts)
                again = min(again, time.perf_counter() - start)
            font, lines, _, _ = L.layout_caption(text, x1 - x0, y1 - y0, spec, fonts)
            name = os.path.basename(font.path) if isinstance(font.path, str) else "Pillow default"
            print(f"{script:8}{n:>7}  {name:24}{font.size:>4}{len(lines):>6}{first * 1e3:>10.1f}{again * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
