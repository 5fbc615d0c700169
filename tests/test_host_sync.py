"""The denoising loops never make the host wait for the device inside a step: a whole pipeline call reads values back
from the device (`.item()`, `bool()`, `int()`, `.cpu()`, ...) and copies host tensors to it the same number of times for
3 steps as for 6, for every scheduler.

On a GPU each such read or blocking copy is a host-device synchronisation: the host stops queueing work until the
device has caught up. diffusers' "fast diffusion" guide keeps the schedulers' sigmas on the CPU for this reason. These
tests run on CPU, so "on the device" is emulated: the UNet's output and whatever `set_timesteps(device=...)` moves to
a device are tagged `OnDevice`, every result computed from them stays tagged (torch's default for tensor subclasses),
and reading a tagged value or copying an untagged tensor to a device is counted."""
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
import sys
import pytest, torch
from minidiff import (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                      DDPMPipeline, DDIMPipeline, DDPMScheduler, UNet2DModel, save_tiny_sd)
from minidiff.cli import SCHEDULERS
sys.path.insert(0, str(Path(__file__).parent))
from test_slicing import UNET2D

READS = ['item', 'tolist', 'numpy', 'cpu', '__bool__', '__int__', '__float__', '__index__']
EVENTS = Counter()

class OnDevice(torch.Tensor):
    "A tensor standing for one on the accelerator: what is computed from it is `OnDevice` too (torch's default)."

def _read(name):
    def read(self, *a, **kw):
        EVENTS[name] += 1
        return getattr(self.as_subclass(torch.Tensor), name)(*a, **kw)   # the value, untagged (it is on the host now)
    return read
for _n in READS: setattr(OnDevice, _n, _read(_n))

def on_device(x): return x.as_subclass(OnDevice)

def names_device(args, kw): return 'device' in kw or bool(args and isinstance(args[0], (str, torch.device)))
def non_blocking(args, kw): return bool(kw.get('non_blocking') or (len(args) > 2 and args[2] is True))

@contextmanager
def watch(scheduler):
    "Count reads of device values and host-to-device copies; what `set_timesteps` moves to a device is tagged."
    to, own, set_timesteps = torch.Tensor.to, 'to' in vars(torch.Tensor), scheduler.set_timesteps
    def copy(self, *a, **kw):
        out = to(self, *a, **kw)
        if isinstance(self, OnDevice) or not names_device(a, kw): return out
        if moving_in_set_timesteps: return on_device(out)
        if not non_blocking(a, kw): EVENTS['host_to_device'] += 1
        return out
    def tagging_set_timesteps(*a, **kw):
        nonlocal moving_in_set_timesteps
        moving_in_set_timesteps = True
        try: return set_timesteps(*a, **kw)
        finally: moving_in_set_timesteps = False
    moving_in_set_timesteps = False          # set_timesteps(device=...) is running: what it moves is on the device
    EVENTS.clear(); torch.Tensor.to, scheduler.set_timesteps = copy, tagging_set_timesteps
    try: yield EVENTS
    finally:
        if own: torch.Tensor.to = to
        else: del torch.Tensor.to                  # back to the inherited method, as before
        del scheduler.set_timesteps

def test_the_watch_counts_reads_and_copies():
    s, to, own = DDPMScheduler(), torch.Tensor.to, 'to' in vars(torch.Tensor)
    with watch(s) as events:
        s.set_timesteps(4, device='cpu')
        x = on_device(torch.ones(2)) * 3                              # stays on the device: not counted
        assert isinstance(x, OnDevice) and isinstance(s.timesteps, OnDevice)
        x.sum().item(); bool(x[0] > 0); [0, 1][s.timesteps[-1]]       # three reads
        torch.zeros(()).to('cpu'); torch.zeros(()).to(torch.float16)  # a blocking copy to a device; a cast
        torch.zeros(()).to('cpu', non_blocking=True)                  # queued: the host does not wait
    assert events == Counter(item=1, __bool__=1, __index__=1, host_to_device=1)
    assert torch.Tensor.to is to and ('to' in vars(torch.Tensor)) == own and 'set_timesteps' not in vars(s)

@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = StableDiffusionPipeline.from_pretrained(save_tiny_sd(tmp_path_factory.mktemp("sd")/"sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe

def events(pipe, steps, **kw):
    "What one call with `steps` steps counts. The UNet's output is on the device, so every step's latents are too."
    def unet_on_device(module, args, out):
        out.sample = on_device(out.sample)
        return out
    hook = pipe.unet.register_forward_hook(unet_on_device)
    try:
        with watch(pipe.scheduler) as ev:
            pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    finally: hook.remove()
    return Counter(ev)

@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sd_loop_waits_for_nothing_per_step(sd, name):
    sd.scheduler = SCHEDULERS[name].from_config(sd.scheduler.config)
    kw = dict(prompt="a red circle", height=32, width=32)
    assert events(sd, 6, **kw) == events(sd, 3, **kw)

@pytest.mark.parametrize("pipeline", [DDPMPipeline, DDIMPipeline])
def test_unconditional_loops_wait_for_nothing_per_step(pipeline):
    torch.manual_seed(0)
    pipe = pipeline(unet=UNet2DModel.from_config({**UNET2D, "sample_size": 64}).eval(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    assert events(pipe, 6) == events(pipe, 3)

@pytest.mark.parametrize("name", ["ddim", "unipc"])
def test_img2img_and_inpaint_loops_wait_for_nothing_per_step(sd, name):
    "Image-to-image starts partway down the schedule; 4-channel inpainting noises the known region again every step."
    image, mask = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    for cls, kw in ((StableDiffusionImg2ImgPipeline, dict(image=image)),
                    (StableDiffusionInpaintPipeline, dict(image=image, mask_image=mask, height=32, width=32))):
        pipe = cls(**sd.components)
        pipe.scheduler = SCHEDULERS[name].from_config(sd.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        kw.update(prompt="a red circle", strength=0.8)
        assert events(pipe, 10, **kw) == events(pipe, 5, **kw), cls.__name__
