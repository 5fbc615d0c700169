#!/usr/bin/env python
"""Run diffusers' own scheduler tests and DDPM/DDIM pipeline fast tests against minidiff.

Not part of the default test run (it lives outside `tests/`, and the repository's pytest collects `tests/` only).
It needs diffusers' *test files*, which minidiff does not ship: point it at the `tests/` folder of a diffusers
checkout (ideally the tag matching the installed diffusers, see `settings.ini`):

    python scripts/diffusers_tests.py --diffusers-tests ~/src/diffusers/tests          # minidiff swapped in
    python scripts/diffusers_tests.py --diffusers-tests ~/src/diffusers/tests --reference  # pure diffusers
    python scripts/diffusers_tests.py --diffusers-tests ~/src/diffusers/tests --both       # both, then compare
    DIFFUSERS_TESTS=~/src/diffusers/tests python scripts/diffusers_tests.py -k full_loop  # extra pytest args

How the swap works: before any test module is imported, the diffusers classes that minidiff re-implements are
replaced on the `diffusers` package (`setattr(diffusers, "EulerDiscreteScheduler", minidiff's)`), so a test's
`from diffusers import EulerDiscreteScheduler` yields minidiff's class while diffusers' harness (SchedulerCommonTest,
PipelineTesterMixin, testing_utils, CaptureLogger, ...) stays diffusers'. Names minidiff lacks (e.g. `DDIMPipeline`)
are left as diffusers' and reported as "not available": their tests then run diffusers' pipeline around minidiff's
parts. Output: per file passed/failed/errors/skipped, then the failing test ids grouped by file and by the error's
first line. With `--both`, a failure that also happens in pure diffusers is listed apart as version skew/environment
(test files newer or older than the installed diffusers, a missing optional dependency, no Hub access), since it says
nothing about minidiff. Failures listed in `KNOWN` (tests of diffusers' private internals, kept on purpose) are
printed apart with the reason. Keep runs light: `OMP_NUM_THREADS=1`, and `HF_HUB_OFFLINE=1` (both set if unset).
"""
import argparse, json, os, re, subprocess, sys, tempfile
from collections import defaultdict
from pathlib import Path

FILES = ["schedulers/test_schedulers.py", "schedulers/test_scheduler_ddpm.py", "schedulers/test_scheduler_ddim.py",
         "schedulers/test_scheduler_pndm.py", "schedulers/test_scheduler_lms.py", "schedulers/test_scheduler_euler.py",
         "schedulers/test_scheduler_euler_ancestral.py", "schedulers/test_scheduler_dpm_multi.py",
         "schedulers/test_scheduler_unipc.py", "pipelines/ddpm/test_ddpm.py", "pipelines/ddim/test_ddim.py"]
# diffusers name -> minidiff name; what minidiff does not export is reported as "not available"
SWAP = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "UNet2DModel",
        "DDPMPipeline", "DDIMPipeline"]


# Failures kept on purpose: they test diffusers' private internals, not behaviour a user relies on (see CONTRIBUTING.md)
KNOWN = {"DDPMSchedulerTest::test_variance": "calls the private DDPMScheduler._get_variance (minidiff computes the "
                                             "variance inside step)",
         "DDIMSchedulerTest::test_variance": "calls the private DDIMScheduler._get_variance",
         "DDPMSchedulerTest::test_variance_type": "variance_type='other': diffusers silently falls through to "
                                                  "'fixed_small'; minidiff raises a ValueError naming the value",
         "DDIMPipelineFastTests::test_save_load_local": "reads diffusers' own loading log (logger "
                                                        "diffusers.pipelines.pipeline_utils); minidiff's loader does not "
                                                        "log there. The save/reload itself is checked in "
                                                        "test_ddim_pipeline.py"}


def swap_in_minidiff():
    "Put minidiff's classes on the `diffusers` package; return (swapped, not available)."
    import diffusers, minidiff
    swapped, missing = [], []
    for name in SWAP:
        if hasattr(minidiff, name): setattr(diffusers, name, getattr(minidiff, name)); swapped.append(name)
        else: missing.append(name)
    return swapped, missing


class Collect:
    "pytest plugin: one outcome per test id (a failing setup/teardown counts as an error)."
    def __init__(self): self.res = {}
    def pytest_runtest_logreport(self, report):
        rid, prev = report.nodeid, self.res.get(report.nodeid)
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome if report.when == "call" else ("error" if report.failed else "skipped")
            self.res[rid] = dict(outcome=outcome, msg=_first_line(report) if report.failed else "")
        elif report.when == "teardown" and report.failed and prev is not None and prev["outcome"] != "failed":
            self.res[rid] = dict(outcome="error", msg=_first_line(report))
    def pytest_collectreport(self, report):
        if report.failed: self.res[report.nodeid + "::<collection>"] = dict(outcome="error", msg=_first_line(report))


def _first_line(report):
    "The exception line pytest prints with `E`, shortened and stripped of numbers, as a grouping key."
    text = str(report.longrepr)
    lines = [l[1:].strip() for l in text.splitlines() if l.startswith("E ")]
    line = next((l for l in lines if l), text.strip().splitlines()[-1] if text.strip() else "?")
    return line[:160]


def run_mode(tests_dir, reference, extra):
    "Run the files in this process (swap first unless `reference`); return {test id: outcome}."
    os.environ.setdefault("OMP_NUM_THREADS", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
    swapped, missing = ([], []) if reference else swap_in_minidiff()
    import pytest
    paths = [str(tests_dir / f) for f in FILES if (tests_dir / f).exists()]
    absent = [f for f in FILES if not (tests_dir / f).exists()]
    col = Collect()
    os.chdir(tests_dir.parent)
    pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore", "--rootdir", str(tests_dir.parent), "--no-header",
                 "-rN", *extra, *paths], plugins=[col])
    return dict(mode="reference" if reference else "minidiff", swapped=swapped, not_available=missing,
                absent_files=absent, results=col.res)


def _file_of(tid): return tid.split("::")[0].split("tests/", 1)[-1]


def report(run, skew=None):
    "Print counts per file, then failures grouped by file and error line (skew: ids failing in pure diffusers too)."
    res, skew = run["results"], skew or set()
    print(f"\n== mode: {run['mode']}")
    if run["mode"] == "minidiff":
        print("swapped in:", ", ".join(run["swapped"]))
        print("not available in minidiff (diffusers' class kept):", ", ".join(run["not_available"]) or "-")
    if run["absent_files"]: print("test files not found:", ", ".join(run["absent_files"]))
    counts = defaultdict(lambda: defaultdict(int))
    for tid, r in res.items(): counts[_file_of(tid)][r["outcome"]] += 1
    print(f"{'file':48} {'passed':>6} {'failed':>6} {'errors':>6} {'skipped':>7}")
    tot = defaultdict(int)
    for f in sorted(counts):
        c = counts[f]
        for k in ("passed", "failed", "error", "skipped"): tot[k] += c[k]
        print(f"{f:48} {c['passed']:6} {c['failed']:6} {c['error']:6} {c['skipped']:7}")
    print(f"{'TOTAL':48} {tot['passed']:6} {tot['failed']:6} {tot['error']:6} {tot['skipped']:7}")
    bad = {t: r for t, r in res.items() if r["outcome"] in ("failed", "error")}
    known = {t for t in bad if run["mode"] == "minidiff" and t not in skew and t.split("::", 1)[-1] in KNOWN}
    for title, ids in (("failures", [t for t in bad if t not in skew and t not in known]),
                       ("failing in pure diffusers too (version skew / environment, not minidiff's)",
                        [t for t in bad if t in skew]),
                       ("known: diffusers' private internals (scripts/diffusers_tests.py KNOWN)", sorted(known))):
        if not ids: continue
        print(f"\n-- {title}: {len(ids)}")
        groups = defaultdict(list)
        for t in ids: groups[(_file_of(t), re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", bad[t]["msg"]))].append(t)
        for (f, msg), ts in sorted(groups.items()):
            print(f"  [{f}] {len(ts)}x {msg}")
            for t in sorted(ts):
                print(f"      {t.split('::', 1)[1]}" + (f"  <- {KNOWN[t.split('::', 1)[1]]}" if t in known else ""))
    return tot


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--diffusers-tests", default=os.environ.get("DIFFUSERS_TESTS"),
                   help="a diffusers checkout's tests/ folder (or env DIFFUSERS_TESTS)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reference", action="store_true", help="run pure diffusers (nothing swapped)")
    g.add_argument("--both", action="store_true", help="run reference and minidiff in two processes and compare")
    p.add_argument("--json", help="also write the outcomes to this file")
    args, extra = p.parse_known_args()
    if not args.diffusers_tests: p.error("give --diffusers-tests PATH or set DIFFUSERS_TESTS")
    tests_dir = Path(args.diffusers_tests).expanduser().resolve()
    if not (tests_dir / "schedulers").is_dir(): p.error(f"{tests_dir} has no schedulers/ folder")
    if not args.both:
        run = run_mode(tests_dir, args.reference, extra)
        if args.json: Path(args.json).write_text(json.dumps(run, indent=1))
        report(run)
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("reference", "minidiff"):
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--diffusers-tests", str(tests_dir), "--json", str(out), *extra]
            subprocess.run(cmd + (["--reference"] if mode == "reference" else []), stdout=subprocess.DEVNULL)
            runs[mode] = json.loads(out.read_text())
    ref_bad = {t for t, r in runs["reference"]["results"].items() if r["outcome"] in ("failed", "error")}
    report(runs["reference"])
    report(runs["minidiff"], skew=ref_bad)
    if args.json: Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__": main()
