"""Draw nbs/images/micro_sd_examples.png: every colour x shape from the shipped micro SD with `minidiff generate`'s
defaults (DPM-Solver++ 2M, 25 steps, guidance 7.5), seed 0 for every prompt, titled with what the evaluator reads."""
import sys
from pathlib import Path
import torch
from PIL import Image, ImageDraw
from minidiff import StableDiffusionPipeline, DPMSolverMultistepScheduler
from minidiff.core import MICRO_SD
from minidiff.shapes import COLOURS, SHAPES, article
from minidiff.quality import read_image

def main(out=Path(__file__).parents[1]/"nbs"/"images"/"micro_sd_examples.png", side=104, pad=8, label=20):
    pipe = StableDiffusionPipeline.from_pretrained(MICRO_SD); pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    prompts = [f"{article(c)} {s}" for s in SHAPES for c in COLOURS]            # rows: shapes, columns: colours
    images = pipe(prompts, num_inference_steps=25, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(0) for _ in prompts]).images
    grid = Image.new("RGB", (len(COLOURS) * (side + pad), len(SHAPES) * (side + label + 4)), "white")
    draw, right = ImageDraw.Draw(grid), 0
    for k, im in enumerate(images):
        r = read_image(im)
        x, y = (k % len(COLOURS)) * (side + pad), (k // len(COLOURS)) * (side + label + 4)
        grid.paste(im.resize((side, side), Image.BILINEAR), (x, y))
        draw.text((x, y + side + 3), f"{r.colour} {r.shape}", fill="black")
        right += (r.colour, r.shape) == tuple(prompts[k].split()[-2:])
    grid.save(out)
    print(f"wrote {out}: the evaluator reads {right} of {len(prompts)} right")

if __name__ == "__main__": main(*sys.argv[1:2])
