"""Draw nbs/images/micro_sd_examples.png: every colour x shape from the shipped micro SD with `minidiff generate`'s
defaults (DPM-Solver++ 2M, 25 steps, guidance 7.5), seed 0 for every prompt, titled with what the evaluator reads."""
import sys
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw
from minidiff import StableDiffusionPipeline
from minidiff.core import MICRO_SD
from minidiff.shapes import COLOURS, SHAPES
from minidiff.quality import prompt_set, generate_set, follow_rates, read_image

def main(out=Path(__file__).parents[1]/"nbs"/"images"/"micro_sd_examples.png", side=104, pad=8, label=24):
    pipe = StableDiffusionPipeline.from_pretrained(MICRO_SD); pipe.set_progress_bar_config(disable=True)
    items = prompt_set(plain_seeds=1, background_seeds=0)         # "a red circle", ...: colour-major, seed 0 each
    images = generate_set(pipe, items, 7.5)                        # the table's sampler: DPM-Solver++ 2M, 25 steps
    grid = Image.new("RGB", (len(COLOURS) * (side + pad), len(SHAPES) * (side + label)), "white")
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        x, y = (k // len(SHAPES)) * (side + pad), (k % len(SHAPES)) * (side + label)   # columns: colours, rows: shapes
        grid.paste(Image.fromarray((im * 255).round().astype(np.uint8)).resize((side, side), Image.BILINEAR), (x, y))
        r = read_image(im)
        draw.text((x, y + side + 3), f"{r.colour} {r.shape}", fill="black")
    grid.save(out)
    rates = follow_rates(images, items)
    print(f"wrote {out}: the evaluator reads colour {rates['colour']:.0%}, shape {rates['shape']:.0%} right")

if __name__ == "__main__": main(*sys.argv[1:2])
