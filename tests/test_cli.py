"The `minidiff` command: generate and ddpm on tiny folders, every scheduler name, one-line errors (exit status 2), torchrun."
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
import minidiff.cli as cli
from minidiff import DDPMScheduler, UNet2DModel, save_tiny_sd
from minidiff.cli import SCHEDULERS, SCHEDULER_ALIASES, main, scheduler_name

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
    assert all(name in out for name in SCHEDULERS)
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "generate" in out and "ddpm" in out

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
