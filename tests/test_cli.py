"""The `minidiff` command: generate and ddpm on tiny folders, every scheduler name, one-line errors (exit status 2), torchrun;
image-to-image and inpainting (--image, --strength, --mask), single files (--model FILE, --config) and LoRA (--lora)."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
import minidiff.cli as cli
from safetensors.torch import load_file, save_file
from minidiff import (DDPMScheduler, UNet2DModel, UNet2DConditionModel, StableDiffusionPipeline,
                      StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, save_tiny_sd, save_tiny_inpaint_sd)
from minidiff.cli import SCHEDULERS, SCHEDULER_ALIASES, main, scheduler_name, lora_spec

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY_DDPM = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                 attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)

@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    "A tiny random SD v1.5-layout folder (64x64 images)."
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))

@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    "A tiny random DDPM folder in the google/ddpm-cifar10-32 layout: config, weights and scheduler at the root."
    p = tmp_path_factory.mktemp("tiny-ddpm")
    torch.manual_seed(0)
    UNet2DModel(**TINY_DDPM).save_pretrained(p)
    DDPMScheduler(num_train_timesteps=1000, clip_sample=True, variance_type="fixed_large").save_pretrained(p)
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (p/"model_index.json").write_text(json.dumps(index))
    return p

@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path/"empty-hub-cache"))

def run(argv, capsys):
    "Run the command in-process: (exit status, stdout, stderr)."
    try: code = main(argv)
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err

def pixels(path): return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

# --- generate -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,size", [(1, (64, 64)), (3, (192, 64)), (4, (128, 128))])
def test_generate_writes_a_near_square_grid(sd, tmp_path, capsys, n, size):
    out = tmp_path/"sub"/"out.png"
    code, stdout, _ = run(["generate", "a red circle", "--model", str(sd), "--steps", "2", "--num-images", str(n),
                           "-o", str(out), "-q"], capsys)
    assert code == 0 and stdout.strip() == f"wrote {out}"
    assert Image.open(out).size == size

@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_by_short_name(sd, tmp_path, capsys, name):
    out = tmp_path/f"{name}.png"
    code, _, _ = run(["generate", "a blue square", "--model", str(sd), "--steps", "3", "--num-images", "2",
                      "--scheduler", name, "-o", str(out), "-q"], capsys)
    assert code == 0
    im = pixels(out)
    assert im.shape == (64, 128, 3) and np.isfinite(im).all() and im.std() > 0

def test_scheduler_names_and_aliases():
    import minidiff
    assert {c.__name__ for c in SCHEDULERS.values()} == {n for n in dir(minidiff) if n.endswith("Scheduler")}
    assert scheduler_name("euler-ancestral") == scheduler_name("euler_a") == "euler_a"
    assert scheduler_name("dpmsolver++") == scheduler_name("DPM") == "dpm"
    assert all(v in SCHEDULERS for v in SCHEDULER_ALIASES.values())

def test_seeds_make_each_image_reproducible_alone(sd, tmp_path, capsys):
    grid, one, again = tmp_path/"grid.png", tmp_path/"one.png", tmp_path/"again.png"
    base = ["generate", "a green triangle", "--model", str(sd), "--steps", "3", "-q"]
    assert run(base + ["--num-images", "2", "-o", str(grid)], capsys)[0] == 0
    assert run(base + ["--seed", "1", "-o", str(one)], capsys)[0] == 0
    assert run(base + ["--seed", "1", "-o", str(again)], capsys)[0] == 0
    assert one.read_bytes() == again.read_bytes()                                 # same arguments: same file
    diff = np.abs(pixels(grid)[:, 64:] - pixels(one)).max()                     # batched vs alone: rounding only
    assert diff <= 2, diff
    assert np.abs(pixels(grid)[:, :64] - pixels(one)).max() > 10                  # seed 0 is another image

def test_size_negative_prompt_guidance_dtype(sd, tmp_path, capsys):
    base = ["generate", "a white circle", "--model", str(sd), "--steps", "2", "-q"]
    files = {k: tmp_path/f"{k}.png" for k in ("plain", "wide", "neg", "unguided", "bf16")}
    assert run(base + ["-o", str(files["plain"])], capsys)[0] == 0
    assert run(base + ["--height", "64", "--width", "128", "-o", str(files["wide"])], capsys)[0] == 0
    assert run(base + ["--negative-prompt", "a black square", "-o", str(files["neg"])], capsys)[0] == 0
    assert run(base + ["--guidance", "1", "-o", str(files["unguided"])], capsys)[0] == 0
    assert run(base + ["--dtype", "bfloat16", "--device", "cpu", "-o", str(files["bf16"])], capsys)[0] == 0
    assert Image.open(files["wide"]).size == (128, 64)
    for k in ("neg", "unguided", "bf16"): assert files[k].read_bytes() != files["plain"].read_bytes(), k

def test_progress_bar_unless_quiet(sd, tmp_path, capsys):
    _, _, err = run(["generate", "x", "--model", str(sd), "--steps", "2", "-o", str(tmp_path/"a.png")], capsys)
    assert "2/2" in err
    _, _, err = run(["generate", "x", "--model", str(sd), "--steps", "2", "-o", str(tmp_path/"b.png"), "--quiet"], capsys)
    assert err == ""

@pytest.mark.skipif(not cli.MICRO_SD.is_dir(), reason="the micro SD is not in this checkout's package data")
def test_generate_default_is_the_shipped_micro_sd(tmp_path, capsys):
    out = tmp_path/"micro.png"
    assert run(["generate", "a red circle", "--steps", "2", "-o", str(out), "-q"], capsys)[0] == 0
    assert Image.open(out).size == (64, 64)

# --- ddpm -----------------------------------------------------------------------------------------------------------

def test_ddpm_writes_a_grid(ddpm, tmp_path, capsys):
    out = tmp_path/"ddpm.png"
    code, stdout, _ = run(["ddpm", "--model", str(ddpm), "--steps", "2", "--batch-size", "4", "--output", str(out),
                           "--no-progress"], capsys)
    assert code == 0 and "wrote" in stdout
    im = pixels(out)
    assert im.shape == (64, 64, 3) and im.std() > 0

@pytest.mark.skipif(not cli.MICRO_DDPM.is_dir(), reason="the micro DDPM is not in this checkout's package data")
def test_ddpm_default_is_the_shipped_micro_ddpm(tmp_path, capsys):
    out = tmp_path/"ddpm.png"
    assert run(["ddpm", "--steps", "2", "-o", str(out), "-q"], capsys)[0] == 0
    assert Image.open(out).size == (32, 32)

# --- bad arguments: one line on stderr naming the argument, exit status 2 ------------------------------------------

def bad_cases(tmp):
    (tmp/"a-file.txt").write_text("")
    (tmp/"empty-folder").mkdir()
    (tmp/"folder.png").mkdir()
    (tmp/"blank.txt").write_text("\n  \n")
    return {
        "unknown scheduler": (["generate", "x", "--scheduler", "heun"], "--scheduler"),
        "height not /8": (["generate", "x", "--height", "65"], "--height"),
        "width zero": (["generate", "x", "--width", "0"], "--width"),
        "zero steps": (["generate", "x", "--steps", "0"], "--steps"),
        "negative steps": (["generate", "x", "--steps", "-3"], "--steps"),
        "steps not a number": (["generate", "x", "--steps", "many"], "--steps"),
        "zero images": (["generate", "x", "--num-images", "0"], "--num-images"),
        "negative seed": (["generate", "x", "--seed", "-1"], "--seed"),
        "seed too large": (["generate", "x", "--seed", str(2**64)], "--seed"),
        "guidance not a number": (["generate", "x", "--guidance", "high"], "--guidance"),
        "unknown dtype": (["generate", "x", "--dtype", "float64"], "--dtype"),
        "unknown device": (["generate", "x", "--device", "gpu7"], "--device"),
        "missing model folder": (["generate", "x", "--model", str(tmp/"no-such-model")], "--model"),
        "empty model folder": (["generate", "x", "--model", str(tmp/"empty-folder")], "--model"),
        "uncached hub repo": (["generate", "x", "--model", "nobody/no-such-sd-model"], "--model"),
        "output under a file": (["generate", "x", "-o", str(tmp/"a-file.txt"/"out.png")], "--output"),
        "output is a folder": (["generate", "x", "-o", str(tmp/"folder.png")], "--output"),
        "output not an image": (["generate", "x", "-o", str(tmp/"out.txt")], "--output"),
        "no prompt": (["generate"], "prompt"),
        "prompt and file": (["generate", "x", "--prompts-file", str(tmp/"blank.txt"), "--out-dir", str(tmp)], "prompt"),
        "file without out-dir": (["generate", "--prompts-file", str(tmp/"blank.txt")], "--out-dir"),
        "out-dir without file": (["generate", "x", "--out-dir", str(tmp)], "--out-dir"),
        "file and -o": (["generate", "--prompts-file", str(tmp/"blank.txt"), "--out-dir", str(tmp), "-o", "a.png"], "--output"),
        "file and num-images": (["generate", "--prompts-file", str(tmp/"blank.txt"), "--out-dir", str(tmp),
                                 "--num-images", "2"], "--num-images"),
        "missing prompts file": (["generate", "--prompts-file", str(tmp/"nope.txt"), "--out-dir", str(tmp/"o")], "--prompts-file"),
        "blank prompts file": (["generate", "--prompts-file", str(tmp/"blank.txt"), "--out-dir", str(tmp/"o")], "--prompts-file"),
        "out-dir is a file": (["generate", "--prompts-file", str(tmp/"blank.txt"), "--out-dir", str(tmp/"a-file.txt")], "--out-dir"),
        "ddpm zero steps": (["ddpm", "--steps", "0"], "--steps"),
        "ddpm zero batch": (["ddpm", "--batch-size", "0"], "--batch-size"),
        "ddpm missing model": (["ddpm", "--model", str(tmp/"no-such-model")], "--model"),
        "ddpm output under a file": (["ddpm", "-o", str(tmp/"a-file.txt"/"x.png")], "--output"),
        "no job": ([], "JOB"),
        "unknown job": (["paint"], "JOB"),
        **file_cases(tmp),
    }

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"   # a Linear 32->32 of the tiny UNet

def file_cases(tmp):
    "Bad pictures, single files and LoRA files, made in `tmp`: (argv, the argument the error must name)."
    Image.new("RGB", (64, 64), "red").save(tmp/"pic.png")
    Image.new("L", (32, 32)).save(tmp/"small-mask.png")
    Image.new("RGB", (4, 4)).save(tmp/"tiny.png")
    (tmp/"notes.png").write_text("not a picture")
    (tmp/"pics").mkdir()
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp/"noisy.png"); (tmp/"cut.png").write_bytes((tmp/"noisy.png").read_bytes()[:2000])
    save_file({"model.diffusion_model.x": torch.zeros(64)}, str(tmp/"cut.safetensors"))
    (tmp/"cut.safetensors").write_bytes((tmp/"cut.safetensors").read_bytes()[:-40])
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(2)}, str(tmp/"sdxl.safetensors"))
    save_file({"weight": torch.zeros(2)}, str(tmp/"other.safetensors"))
    (tmp/"junk.ckpt").write_bytes(b"not a checkpoint")
    save_file({f"{Q}.lora_down.weight": torch.zeros(4, 320), f"{Q}.lora_up.weight": torch.zeros(320, 4)},
              str(tmp/"sd15-lora.safetensors"))                                   # SD v1.5's sizes, not the tiny model's
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(32, 4)}, str(tmp/"unknown-lora.safetensors"))
    save_file({f"{Q}.lora_down.weight": torch.zeros(4, 32)}, str(tmp/"half-lora.safetensors"))
    g, pic = ["generate", "x"], ["--image", str(tmp/"pic.png")]
    return {
        "strength above 1": (g + pic + ["--strength", "1.5"], "--strength"),
        "strength below 0": (g + pic + ["--strength=-0.1"], "--strength"),
        "strength not a number": (g + pic + ["--strength", "half"], "--strength"),
        "strength without image": (g + ["--strength", "0.5"], "--strength"),
        "strength runs no step": (g + pic + ["--strength", "0.1", "--steps", "2"], "--strength"),
        "inpaint strength 0": (g + pic + ["--mask", str(tmp/"pic.png"), "--strength", "0"], "--strength"),
        "mask without image": (g + ["--mask", str(tmp/"pic.png")], "--mask"),
        "mask of another size": (g + pic + ["--mask", str(tmp/"small-mask.png")], "--mask"),
        "mask not a picture": (g + pic + ["--mask", str(tmp/"notes.png")], "--mask"),
        "image not a picture": (g + ["--image", str(tmp/"notes.png")], "--image"),
        "image missing": (g + ["--image", str(tmp/"nope.png")], "--image"),
        "image is a folder": (g + ["--image", str(tmp/"pics")], "--image"),
        "image truncated": (g + ["--image", str(tmp/"cut.png")], "--image"),
        "image too small": (g + ["--image", str(tmp/"tiny.png")], "--image"),
        "config without single file": (g + ["--config", str(tmp)], "--config"),
        "single file missing": (g + ["--model", str(tmp/"nope.safetensors")], "--model"),
        "single file truncated": (g + ["--model", str(tmp/"cut.safetensors")], "--model"),
        "single file not SD": (g + ["--model", str(tmp/"other.safetensors")], "--model"),
        "SDXL single file": (g + ["--model", str(tmp/"sdxl.safetensors")], "--model"),
        "ckpt not a checkpoint": (g + ["--model", str(tmp/"junk.ckpt")], "--model"),
        "ddpm single file": (["ddpm", "--model", str(tmp/"other.safetensors")], "--model"),
        "lora missing": (g + ["--lora", str(tmp/"nope.safetensors")], "--lora"),
        "lora scale not a number": (g + ["--lora", f"{tmp/'other.safetensors'}:strong"], "--lora"),
        "lora scale nan": (g + ["--lora", f"{tmp/'other.safetensors'}:nan"], "--lora"),
        "lora truncated": (g + ["--lora", str(tmp/"cut.safetensors")], "--lora"),
        "lora without lora keys": (g + ["--lora", str(tmp/"other.safetensors")], "--lora"),
        "lora of another size": (g + ["--lora", str(tmp/"sd15-lora.safetensors")], "--lora"),
        "lora for unknown layers": (g + ["--lora", str(tmp/"unknown-lora.safetensors")], "--lora"),
        "lora half a pair": (g + ["--lora", str(tmp/"half-lora.safetensors")], "--lora"),
    }

def _case_names():
    import tempfile
    with tempfile.TemporaryDirectory() as d: return list(bad_cases(Path(d)))

@pytest.mark.parametrize("case", _case_names())
def test_bad_argument_is_one_line_and_exit_2(sd, tmp_path, capsys, case):
    argv, arg = bad_cases(tmp_path)[case]
    if argv[:1] == ["generate"] and "--model" not in argv: argv = argv + ["--model", str(sd)]   # the shipped one may be absent
    code, stdout, err = run(argv, capsys)
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("minidiff") and "error:" in err, err
    assert arg in err and "Traceback" not in err, err
    assert stdout == ""

def test_model_of_another_kind(sd, ddpm, tmp_path, capsys):
    code, _, err = run(["generate", "x", "--model", str(ddpm), "-o", str(tmp_path/"a.png")], capsys)
    assert code == 2 and "--model" in err and len(err.splitlines()) == 1
    code, _, err = run(["ddpm", "--model", str(sd), "-o", str(tmp_path/"b.png")], capsys)
    assert code == 2 and "is not a DDPMPipeline" in err and len(err.splitlines()) == 1

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_absent(sd, tmp_path, capsys):
    code, _, err = run(["generate", "x", "--model", str(sd), "--device", "cuda", "-o", str(tmp_path/"a.png")], capsys)
    assert code == 2 and "--device" in err and "not available" in err

def test_missing_shipped_model_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "MICRO_SD", tmp_path/"micro-sd")
    monkeypatch.setattr(cli, "MICRO_DDPM", tmp_path/"micro-ddpm")
    for job in (["generate", "a red circle"], ["ddpm"]):
        code, _, err = run(job + ["-o", str(tmp_path/"x.png")], capsys)
        assert code == 2 and "shipped micro model is not at" in err and len(err.splitlines()) == 1, err

def test_output_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs): raise AssertionError("loaded a model before checking the output path")
    monkeypatch.setattr(cli, "load_pipeline", no_loading)
    (tmp_path/"f").write_text("")
    for job in (["generate", "x"], ["ddpm"]):
        code, _, err = run(job + ["-o", str(tmp_path/"f"/"x.png")], capsys)
        assert code == 2 and "--output" in err

def test_help_reads_well(capsys):
    code, out, _ = run(["generate", "--help"], capsys)
    assert code == 0 and "examples:" in out and "torchrun" in out
    assert all(flag in out for flag in ("--image", "--strength", "--mask", "--lora", "--config", ".safetensors"))
    assert all(name in out for name in SCHEDULERS)
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "generate" in out and "ddpm" in out

# --- starting from a picture: --image, --strength, --mask ----------------------------------------------------------

def picture_files(tmp):
    "A 64x64 picture (a red square on blue) and a mask of a square overlapping it."
    pic = Image.new("RGB", (64, 64), "blue"); pic.paste((255, 0, 0), (16, 16, 48, 48)); pic.save(tmp/"picture.png")
    mask = Image.new("L", (64, 64), 0); mask.paste(255, (24, 24, 56, 56)); mask.save(tmp/"mask.png")
    return tmp/"picture.png", tmp/"mask.png"

def direct(pipe, prompt, **kwargs):
    "What the pipeline itself makes with the command's defaults: DPM-Solver++ 2M, guidance 7.5, image 0 seeded 0."
    pipe.scheduler = SCHEDULERS["dpm"].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, generator=[torch.Generator().manual_seed(0)], **kwargs).images[0]
    return np.asarray(image, dtype=np.int16)

def test_image_is_the_img2img_pipeline(sd, tmp_path, capsys):
    pic, _ = picture_files(tmp_path)
    out = tmp_path/"out.png"
    code, stdout, _ = run(["generate", "a green circle", "--model", str(sd), "--steps", "2", "--image", str(pic),
                           "--strength", "0.5", "-o", str(out), "-q"], capsys)
    assert code == 0 and stdout.strip() == f"wrote {out}"
    want = direct(StableDiffusionImg2ImgPipeline.from_pretrained(sd), "a green circle", image=Image.open(pic),
                  strength=0.5, num_inference_steps=2)
    assert np.array_equal(pixels(out), want)

def test_image_sizes(sd, tmp_path, capsys):
    Image.new("RGB", (70, 50), "red").save(tmp_path/"odd.png")
    base = ["generate", "x", "--model", str(sd), "--steps", "2", "--image", str(tmp_path/"odd.png"), "-q"]
    assert run(base + ["-o", str(tmp_path/"a.png")], capsys)[0] == 0
    assert run(base + ["--height", "32", "--width", "64", "--num-images", "2", "-o", str(tmp_path/"b.png")], capsys)[0] == 0
    assert Image.open(tmp_path/"a.png").size == (64, 48)                          # cut down to multiples of 8
    assert Image.open(tmp_path/"b.png").size == (128, 32)                         # resized, two side by side

def test_mask_is_the_inpaint_pipeline(sd, tmp_path, capsys):
    pic, mask = picture_files(tmp_path)
    out = tmp_path/"out.png"
    code, _, _ = run(["generate", "a green circle", "--model", str(sd), "--steps", "2", "--image", str(pic),
                      "--mask", str(mask), "-o", str(out), "-q"], capsys)
    assert code == 0
    want = direct(StableDiffusionInpaintPipeline.from_pretrained(sd), "a green circle", image=Image.open(pic),
                  mask_image=Image.open(mask), height=64, width=64, num_inference_steps=2)   # strength 1.0
    assert np.array_equal(pixels(out), want)

def test_inpainting_model_needs_a_mask(tmp_path, capsys):
    folder = save_tiny_inpaint_sd(tmp_path/"inpaint-sd")
    pic, mask = picture_files(tmp_path)
    base = ["generate", "x", "--model", str(folder), "--steps", "2", "-q", "--image", str(pic)]
    assert run(base + ["--mask", str(mask), "-o", str(tmp_path/"a.png")], capsys)[0] == 0
    assert Image.open(tmp_path/"a.png").size == (64, 64)
    code, _, err = run(base + ["-o", str(tmp_path/"b.png")], capsys)
    assert code == 2 and "--mask" in err and "9-channel" in err and len(err.splitlines()) == 1, err

def test_prompts_file_with_one_picture(sd, tmp_path, capsys):
    pic, _ = picture_files(tmp_path)
    (tmp_path/"prompts.txt").write_text("a red circle\na blue square\n")
    code, out, _ = run(["generate", "--prompts-file", str(tmp_path/"prompts.txt"), "--out-dir", str(tmp_path/"imgs"),
                        "--model", str(sd), "--steps", "2", "--image", str(pic), "-q"], capsys)
    assert code == 0 and "wrote 2 images" in out
    assert [Image.open(tmp_path/"imgs"/n).size for n in ("00000.png", "00001.png")] == [(64, 64)] * 2

def test_pipeline_input_errors_name_the_argument(sd):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd)
    with pytest.raises(cli.UsageError, match="argument --strength: strength 0.1 of 2 steps"):
        cli.generate(pipe, "x", steps=2, image=Image.new("RGB", (64, 64)), strength=0.1)

def test_files_are_checked_before_loading(sd, tmp_path, capsys, monkeypatch):
    cases = file_cases(tmp_path)
    def no_loading(*args, **kwargs): raise AssertionError("loaded a model before checking the files")
    monkeypatch.setattr(cli, "load_pipeline", no_loading)
    for case in ("mask of another size", "image not a picture", "strength runs no step", "lora truncated",
                 "lora without lora keys", "lora missing"):
        argv, arg = cases[case]
        code, _, err = run(argv + ["-o", str(tmp_path/"x.png")], capsys)
        assert code == 2 and arg in err, (case, err)

# --- single files: --model FILE.safetensors|.ckpt, --config ---------------------------------------------------------

@pytest.fixture(scope="module")
def single(sd, tmp_path_factory):
    "The tiny SD written as one original-layout file."
    return StableDiffusionPipeline.from_pretrained(sd).save_single_file(tmp_path_factory.mktemp("single")/"tiny.safetensors")

def test_single_file_equals_its_folder(sd, single, tmp_path, capsys):
    torch.save({"state_dict": load_file(single)}, tmp_path/"tiny.ckpt")          # as the original .ckpt files nest it
    base, outs = ["generate", "a red circle", "--steps", "2", "-q"], {}
    for name, model in (("folder", [str(sd)]), ("safetensors", [str(single), "--config", str(sd)]),
                        ("ckpt", [str(tmp_path/"tiny.ckpt"), "--config", str(sd)])):
        outs[name] = tmp_path/f"{name}.png"
        assert run(base + ["--model", *model, "-o", str(outs[name])], capsys)[0] == 0, name
    assert outs["folder"].read_bytes() == outs["safetensors"].read_bytes() == outs["ckpt"].read_bytes()

def test_single_file_of_other_sizes_needs_config(single, tmp_path, capsys):
    code, _, err = run(["generate", "x", "--model", str(single), "-o", str(tmp_path/"x.png")], capsys)   # SD v1.5 sizes
    assert code == 2 and "--model" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err

# --- LoRA: --lora FILE[:SCALE] ----------------------------------------------------------------------------------------

def random_lora(unet, path, seed=0, rank=4):
    "A kohya-format LoRA file with random updates of every attention projection of `unet`."
    g, sd = torch.Generator().manual_seed(seed), {}
    for n, m in unet.named_modules():
        if not n.endswith(("to_q", "to_k", "to_v", "to_out.0")): continue
        k = "lora_unet_" + n.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g)
        sd[f"{k}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.5
        sd[f"{k}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path)); return path

@pytest.fixture(scope="module")
def loras(sd, tmp_path_factory):
    d, unet = tmp_path_factory.mktemp("lora"), UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    return random_lora(unet, d/"a.safetensors", seed=0), random_lora(unet, d/"b.safetensors", seed=1)

def test_lora_scale_is_the_call_time_scale(sd, loras, tmp_path, capsys):
    a, b = loras
    runs = {"none": [], "zero": [f"{a}:0"], "half": [f"{a}:0.5"], "one": [str(a)], "both": [f"{a}:0.5", f"{b}:0.5"],
            "mixed": [f"{a}:0.5", f"{b}:0"]}                                  # differing scales: fused one by one
    for name, specs in runs.items():
        argv = ["generate", "a red circle", "--model", str(sd), "--steps", "2", "-q", "-o", str(tmp_path/f"{name}.png")]
        assert run(argv + [x for s in specs for x in ("--lora", s)], capsys)[0] == 0, name
    im = {name: pixels(tmp_path/f"{name}.png") for name in runs}
    pipe = StableDiffusionPipeline.from_pretrained(sd); pipe.load_lora_weights(a)
    want = direct(pipe, "a red circle", num_inference_steps=2, cross_attention_kwargs={"scale": 0.5})
    assert np.array_equal(im["half"], want)
    assert np.array_equal(im["zero"], im["none"])                                 # scale 0: no LoRA, bit for bit
    for x, y in (("half", "none"), ("one", "half"), ("both", "half")): assert np.abs(im[x] - im[y]).max() > 10, (x, y)
    assert np.abs(im["mixed"] - im["half"]).max() <= 2                            # b at 0 adds nothing; a fused at 0.5

def test_lora_spec():
    assert lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_spec("style.safetensors:0.75") == ("style.safetensors", 0.75)
    assert lora_spec("style.safetensors:-1") == ("style.safetensors", -1.0)
    assert lora_spec("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)   # a drive letter
    for bad in ("style.safetensors:strong", "style.safetensors:inf", "style.safetensors:"):
        with pytest.raises(Exception, match="not a number"): lora_spec(bad)

# --- as a program: python -m, the console script, and torchrun ------------------------------------------------------

def test_python_m_bad_argument_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minidiff.cli", "generate", "a red circle", "--steps", "0"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--steps" in r.stderr and "Traceback" not in r.stderr

def test_console_script(sd, tmp_path):
    exe = shutil.which("minidiff")
    if exe is None: pytest.skip("the package is not installed (console script missing)")
    out = tmp_path/"x.png"
    subprocess.run([exe, "generate", "a red circle", "--model", str(sd), "--steps", "1", "-q", "-o", str(out)],
                   check=True, env=ENV, cwd=tmp_path)
    assert Image.open(out).size == (64, 64)

PROMPTS = "a red circle\na blue square on a yellow background\n\na green triangle at the top left\na white circle\n"

def test_prompts_file_in_process(sd, tmp_path, capsys):
    (tmp_path/"prompts.txt").write_text(PROMPTS)
    code, out, _ = run(["generate", "--prompts-file", str(tmp_path/"prompts.txt"), "--out-dir", str(tmp_path/"imgs"),
                        "--model", str(sd), "--steps", "2", "-q"], capsys)
    assert code == 0 and "wrote 4 images" in out
    assert sorted(p.name for p in (tmp_path/"imgs").iterdir()) == ["00000.png", "00001.png", "00003.png", "00004.png"]

def test_torchrun_two_processes_equal_one_bit_for_bit(sd, tmp_path):
    (tmp_path/"prompts.txt").write_text(PROMPTS)
    args = ["generate", "--prompts-file", str(tmp_path/"prompts.txt"), "--model", str(sd), "--steps", "2",
            "--scheduler", "euler_a", "--device", "cpu", "-q"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minidiff.cli", *args, "--out-dir", str(tmp_path/"one")],
                   check=True, env=ENV, cwd=tmp_path)
    t1 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "minidiff.cli", *args, "--out-dir", str(tmp_path/"two")],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path)
    t2 = time.perf_counter()
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote 4 images") == 1                                  # rank 0 reports, once
    one, two = sorted((tmp_path/"one").iterdir()), sorted((tmp_path/"two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] == ["00000.png", "00001.png", "00003.png", "00004.png"]
    for a, b in zip(one, two): assert a.read_bytes() == b.read_bytes(), a.name
    assert len({p.read_bytes() for p in one}) == 4                                # four different images
    print(f"1 process: {t1 - t0:.1f}s, torchrun with 2 processes: {t2 - t1:.1f}s")
