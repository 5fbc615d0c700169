"The procedural shapes dataset: seeded, true captions, every attribute drawn, shapes inside the picture."
import random, re
import pytest, torch
from minidiff.shapes import COLOURS, SHAPES, SIZES, CORNERS, Scene, sample_scene, caption, render, coverage, shapes_batch

def test_same_seed_same_batch_other_seed_other_batch():
    a, b, c = shapes_batch(8, 3), shapes_batch(8, 3), shapes_batch(8, 4)
    assert a.captions == b.captions and torch.equal(a.images, b.images)
    assert a.captions != c.captions

def test_string_seeds_are_stable():
    assert shapes_batch(4, "vae-0-7").captions == shapes_batch(4, "vae-0-7").captions

CAPTION = re.compile(r"^an? (?:(small|large) )?(\w+) (\w+)(?: at the (top left|top right|bottom left|bottom right))?"
                     r"(?: on an? (\w+) background)?$")

def test_captions_are_true():
    rng = random.Random(0)
    for _ in range(500):
        s = sample_scene(rng)
        m = CAPTION.match(caption(s, rng))
        assert m, caption(s, rng)
        size, colour, shape, where, bg = m.groups()
        assert (colour, shape) == (s.colour, s.shape)
        assert size in (None, s.size) and where in (None, s.position) and bg in (None, s.background)

def test_articles():
    s = Scene('orange', 'circle', 'orange', 'medium', 'center', .5, .5, .2)
    assert caption(s, random.Random(0), p=1.0) == "an orange circle on an orange background"

def test_every_attribute_is_drawn():
    rng = random.Random(1)
    scenes = [sample_scene(rng) for _ in range(2000)]
    assert {s.colour for s in scenes} == set(COLOURS) == {s.background for s in scenes}
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.size for s in scenes} == set(SIZES) and {s.position for s in scenes} == {'center', *CORNERS}
    assert all(s.colour != s.background for s in scenes)
    assert not any(s.size == 'large' and s.position in CORNERS for s in scenes)

@pytest.mark.parametrize("size", [32, 64])
def test_shapes_stay_inside_the_picture(size):
    b = shapes_batch(300, 5, size=size)
    m = coverage(b.scenes, size)                                     # (B, 1, H, W)
    ring = torch.cat([m[..., :1, :].flatten(1), m[..., -1:, :].flatten(1), m[..., :, :1].flatten(1), m[..., :, -1:].flatten(1)], 1)
    assert ring.max() == 0
    assert (m.flatten(1).sum(1) > 4).all()                          # no shape vanishes, even at 32x32

def test_render_colours_and_range():
    s = Scene('yellow', 'triangle', 'purple', 'large', 'center', .5, .5, .28)
    im = render([s], 64)[0]
    assert im.min() >= 0 and im.max() <= 1
    torch.testing.assert_close(im[:, 40, 32], torch.tensor(COLOURS['yellow']) / 255)
    torch.testing.assert_close(im[:, 2, 2], torch.tensor(COLOURS['purple']) / 255)

def test_shape_areas_are_comparable():
    areas = {k: coverage([Scene('red', k, 'blue', 'medium', 'center', .5, .5, .2)], 64).sum().item() for k in SHAPES}
    assert max(areas.values()) < 1.6 * min(areas.values())
