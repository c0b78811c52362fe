#!/usr/bin/env python
"""Run timm's own model tests on converted models, next to the unconverted baseline.

timm ships ``tests/test_models.py`` in its source distribution. This script fetches
that distribution for the *installed* timm version at run time
(``pip download --no-deps --no-binary :all: timm==<version>``; nothing is copied into
this repository), then runs its forward / backward / fx-forward / fx-backward tests
on a sample of small models once per preset, each time in a fresh pytest process in
which ``timm.create_model`` is patched to return ``normswap.transform(model, preset)``.
The run with no preset is the baseline.

A preset *applies* to a model when ``normswap.plan`` converts at least one of its
sites; where it does not (``ln*`` on a ResNet), the tests are counted as n/a, not as
passes. A *regression* is a test that passes unconverted and fails converted.

    python scripts/timm_suite.py                                   # default sample, presets
    python scripts/timm_suite.py --models 'test_*,resnet18' --presets l1bn 'bwn:fallback=l1bn'
    python scripts/timm_suite.py --timm-src /tmp/timm-1.0.31 --markdown table.md --json out.json

Preset syntax: a preset name, optionally ``:key=value,...`` for its kwargs (values
parsed as JSON where they parse, else strings), or a JSON spec (``{"preset": ...}``).

The file doubles as the pytest plugin of the child processes (``-p timm_suite``): its
hooks do nothing unless ``NORMSWAP_SUITE_OUT`` is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

TESTS = {  # short name -> test function of timm's tests/test_models.py
    "forward": "test_model_forward",
    "backward": "test_model_backward",
    "fx_forward": "test_model_forward_fx",
    "fx_backward": "test_model_backward_fx",
}
DEFAULT_PRESETS = ("l1bn", "ln*", "dn*", "bwn:fallback=l1bn")
# timm's own tiny test models plus small members of many families (BatchNorm, LayerNorm,
# LayerNorm2d, GroupNorm, BatchNormAct, *Act norms, attention, mobile, hybrids).
DEFAULT_MODELS = (
    "test_*",
    "resnet10t", "resnet18", "regnetx_002", "mobilenetv3_small_050", "mobilenetv2_050",
    "lcnet_050", "ghostnet_050", "tinynet_e", "mnasnet_small", "efficientnet_b0",
    "convnext_atto", "convnextv2_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "levit_128s", "mobilevit_xxs", "edgenext_xx_small", "efficientvit_b0", "fastvit_t8",
    "repghostnet_050", "mambaout_femto", "starnet_s050", "poolformerv2_s12", "dla46_c",
    "xcit_nano_12_p16_224",
)
ENV_SPEC = "NORMSWAP_SUITE_SPEC"        # JSON spec for the child (absent: baseline)
ENV_OUT = "NORMSWAP_SUITE_OUT"          # JSON-lines file the child appends results to
ENV_SELECT = "NORMSWAP_SUITE_SELECT"    # JSON {"models": [...], "tests": [...]}
NA = "normswap-n/a"                     # skip reason prefix: preset does not apply


# -- presets ---------------------------------------------------------------------------

def parse_preset(text: str) -> dict:
    """``"bwn:fallback=l1bn,p=1"`` -> ``{"preset": "bwn", "kwargs": {"fallback": "l1bn", "p": 1}}``;
    a JSON object is taken as a spec dict as it is."""
    text = text.strip()
    if text.startswith("{"):
        spec = json.loads(text)
        if not isinstance(spec, dict):
            raise ValueError(f"--presets: a JSON spec must be an object, got {text!r}")
        return spec
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"--presets: empty preset name in {text!r}")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--presets: expected key=value after ':' in {text!r}, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return {"preset": name, "kwargs": kwargs} if kwargs else {"preset": name}


def label_of(spec: Optional[dict]) -> str:
    if spec is None:
        return "unconverted"
    kw = spec.get("kwargs") or {}
    extra = set(spec) - {"preset", "kwargs"}
    if extra or "preset" not in spec:
        return json.dumps(spec, sort_keys=True)
    return spec["preset"] + ("" if not kw else " (" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")")


# -- the patch applied in each child process --------------------------------------------

class PresetDoesNotApply(Exception):
    """Raised (as a pytest skip in the child) when a preset converts no site of a model."""


def converting_create_model(create_model: Callable, spec: dict, skip: Callable[[str], None]) -> Callable:
    """Wrap ``timm.create_model``: build the model, then apply ``spec`` in place.

    When the spec cannot apply to the model (``normswap.plan`` refuses it, e.g. a
    model with no normalization layer, or converts none of its sites), ``skip`` is
    called with a reason starting with ``NA`` (the test is then not applicable).
    Anything else that goes wrong, in ``plan`` or ``transform``, propagates: the
    test fails.
    """
    import normswap

    @functools.wraps(create_model)
    def create(*args, **kwargs):
        model = create_model(*args, **kwargs)
        name = args[0] if args else kwargs.get("model_name", "?")
        try:
            counts = normswap.plan(model, spec).counts()
        except (normswap.TransformError, normswap.SpecError) as e:
            skip(f"{NA}: {label_of(spec)} on {name}: {str(e).splitlines()[0][:200]}")
        if counts["converted"] == 0:
            skip(f"{NA}: {label_of(spec)} converts no site of {name} ({counts})")
        return normswap.transform(model, spec, inplace=True)

    return create


def patch_timm(spec: dict, skip: Callable[[str], None]) -> None:
    """Replace ``create_model`` everywhere timm exposes it (before tests import it)."""
    import timm
    import timm.models
    import timm.models._factory as factory
    wrapped = converting_create_model(factory.create_model, spec, skip)
    for mod in (timm, timm.models, factory):
        mod.create_model = wrapped


def select_items(items: Sequence, models: Sequence[str], tests: Sequence[str]) -> tuple:
    """(kept, dropped) pytest items: the chosen test functions on the chosen models."""
    names = {TESTS[t] for t in tests}
    wanted = set(models)
    kept, dropped = [], []
    for it in items:
        params = getattr(getattr(it, "callspec", None), "params", {})
        fn = getattr(it, "originalname", it.name.split("[")[0])
        (kept if fn in names and params.get("model_name") in wanted else dropped).append(it)
    return kept, dropped


# pytest hooks (active in the children only, where ENV_OUT is set) ----------------------

def pytest_configure(config):
    if not os.environ.get(ENV_OUT):
        return
    import torch
    torch.set_num_threads(int(os.environ.get("NORMSWAP_SUITE_THREADS", "1")))
    spec = os.environ.get(ENV_SPEC)
    if spec:
        import pytest
        patch_timm(json.loads(spec), lambda reason: pytest.skip(reason))


def pytest_collection_modifyitems(session, config, items):
    if not os.environ.get(ENV_OUT):
        return
    sel = json.loads(os.environ[ENV_SELECT])
    kept, dropped = select_items(items, sel["models"], sel["tests"])
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)


def pytest_runtest_logreport(report):
    out = os.environ.get(ENV_OUT)
    if not out:
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        outcome = "n/a" if NA in reason else "skipped"
    else:
        outcome = "passed" if report.passed else "failed"
        reason = ""
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            reason = crash.message if crash is not None else str(report.longrepr)
            reason = reason.strip().splitlines()[0][:300] if reason.strip() else ""
    nodeid = report.nodeid.split("::")[-1]
    with open(out, "a") as f:
        f.write(json.dumps({"test": nodeid, "outcome": outcome, "reason": reason,
                            "when": report.when}) + "\n")


# -- the parent: fetch timm's tests, run them per preset, tabulate ------------------------

def fetch_timm_tests(dest: str, src: Optional[str] = None) -> str:
    """Path of timm's ``tests/test_models.py`` for the installed timm version.

    ``src``: an extracted timm source tree or an sdist ``.tar.gz`` already at hand;
    otherwise pip downloads the sdist of the installed version into ``dest``.
    """
    import timm
    if src and os.path.isdir(src):
        path = os.path.join(src, "tests", "test_models.py")
        if not os.path.isfile(path):
            raise SystemExit(f"--timm-src {src}: no tests/test_models.py in it")
        return path
    if src:
        tarball = src
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", f"timm=={timm.__version__}", "-d", dest]
        print("fetching timm's tests:", " ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        tars = [f for f in os.listdir(dest) if f.endswith(".tar.gz")]
        if r.returncode != 0 or not tars:
            raise SystemExit(f"could not download the timm {timm.__version__} source distribution "
                             f"(needs network access to a package index):\n{r.stderr[-2000:]}\n"
                             f"pass --timm-src DIR_OR_TARBALL to use one at hand")
        tarball = os.path.join(dest, tars[0])
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers()
                   if m.isfile() and "/tests/" in m.name and m.name.endswith(".py")]
        if not members:
            raise SystemExit(f"{tarball}: no tests/ folder in this archive")
        try:
            tf.extractall(dest, members=members, filter="data")
        except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters
            tf.extractall(dest, members=members)
    top = members[0].name.split("/")[0]
    return os.path.join(dest, top, "tests", "test_models.py")


def expand_models(patterns: Sequence[str]) -> List[str]:
    """Model names from names / globs (against ``timm.list_models()``), in order, unique."""
    import timm
    every = timm.list_models()
    out: List[str] = []
    for p in patterns:
        hits = fnmatch.filter(every, p) if any(c in p for c in "*?[") else [p]
        if not hits or (hits == [p] and p not in every):
            raise SystemExit(f"--models: {p!r} matches no timm model")
        out += [h for h in hits if h not in out]
    return out


@dataclass
class Run:
    """The results of one preset (or the baseline) over the sample."""
    label: str
    results: Dict[str, dict] = field(default_factory=dict)   # test id -> record
    seconds: float = 0.0
    returncode: int = 0

    def count(self, outcome: str) -> int:
        return sum(r["outcome"] == outcome for r in self.results.values())


def run_preset(test_file: str, spec: Optional[dict], models: Sequence[str], tests: Sequence[str],
               timeout: float, threads: int) -> Run:
    run = Run(label_of(spec))
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        out = f.name
    env = dict(os.environ)
    env.pop(ENV_SPEC, None)
    if spec is not None:
        env[ENV_SPEC] = json.dumps(spec)
    here = os.path.dirname(os.path.abspath(__file__))
    env.update({ENV_OUT: out, ENV_SELECT: json.dumps({"models": list(models), "tests": list(tests)}),
                "NORMSWAP_SUITE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                "PYTHONPATH": os.pathsep.join([here] + [p for p in [env.get("PYTHONPATH")] if p])})
    tests_dir = os.path.dirname(test_file)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "timm_suite", "-p", "no:cacheprovider",
           "--rootdir", tests_dir, "-c", os.devnull, "-W", "ignore", "--no-header", "-rN",
           "--tb=no", test_file]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, cwd=tests_dir, capture_output=True, text=True, timeout=timeout)
        run.returncode = proc.returncode
        if proc.returncode not in (0, 1):
            print(f"[{run.label}] pytest exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
    except subprocess.TimeoutExpired:
        run.returncode = -1
        print(f"[{run.label}] timed out after {timeout:.0f} s; tests not reached are missing", file=sys.stderr)
    run.seconds = time.time() - t0
    with open(out) as f:
        for line in f:
            rec = json.loads(line)
            prev = run.results.get(rec["test"])
            if prev is None or prev["outcome"] == "passed":   # a teardown error overrides a pass
                run.results[rec["test"]] = rec
    os.unlink(out)
    return run


@dataclass
class Row:
    """One line of the summary table."""
    label: str
    applicable: int
    passed: int
    failed: int
    na: int
    skipped: int
    regressions: List[str]
    seconds: float

    def cells(self) -> List[str]:
        return [self.label, f"{self.passed}/{self.applicable}", str(self.failed), str(self.na),
                str(self.skipped), str(len(self.regressions)), f"{self.seconds:.0f}"]


HEADER = ["preset", "passed / applicable", "failed", "n/a", "skipped by timm", "regressions", "time s"]


def summarize(baseline: Run, runs: Sequence[Run]) -> List[Row]:
    """Rows for the baseline and every preset. ``applicable`` counts the tests run
    (passed + failed); a regression passed in the baseline and failed converted."""
    rows = []
    for run in [baseline, *runs]:
        regress = sorted(t for t, r in run.results.items()
                         if r["outcome"] == "failed" and baseline.results.get(t, {}).get("outcome") == "passed")
        p, fl = run.count("passed"), run.count("failed")
        rows.append(Row(run.label, p + fl, p, fl, run.count("n/a"), run.count("skipped"),
                        regress if run is not baseline else [], run.seconds))
    return rows


def model_of(test_id: str) -> str:
    """``test_model_forward[1-resnet18]`` -> ``resnet18`` (ids are batch size, then model)."""
    return test_id.split("[", 1)[-1].rstrip("]").split("-", 1)[-1]


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("*", "\\*") for c in r.cells()) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS),
                    help=f"presets to run besides the baseline (default: {' '.join(DEFAULT_PRESETS)})")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated timm model names or globs (default: a sample of small models)")
    ap.add_argument("--tests", default=",".join(TESTS), help=f"comma-separated subset of {', '.join(TESTS)}")
    ap.add_argument("--timm-src", help="timm source tree or sdist tarball to take tests from (no download)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per preset run (default 3600)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each run (default 1)")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--markdown", help="write the summary table to this file")
    args = ap.parse_args(argv)

    try:
        specs = [parse_preset(p) for p in args.presets]
    except ValueError as e:
        ap.error(str(e))
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    bad = [t for t in tests if t not in TESTS]
    if bad:
        ap.error(f"--tests: unknown {bad}; accepted: {', '.join(TESTS)}")
    import normswap
    for s in specs:   # a bad spec fails here, not as many failed tests
        try:
            normswap.Spec.coerce(s)
        except Exception as e:  # noqa: BLE001 - report whatever the spec check says
            ap.error(f"--presets: {label_of(s)}: {e}")
    models = expand_models([m.strip() for m in args.models.split(",") if m.strip()])

    import timm
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        test_file = fetch_timm_tests(tmp, args.timm_src)
        print(f"timm {timm.__version__}, torch {torch.__version__}, normswap {normswap.__version__}; "
              f"{len(models)} models x {len(tests)} tests; tests from {test_file}", file=sys.stderr)
        runs = []
        for spec in [None, *specs]:
            run = run_preset(test_file, spec, models, tests, args.timeout, args.threads)
            print(f"[{run.label}] {run.count('passed')} passed, {run.count('failed')} failed, "
                  f"{run.count('n/a')} n/a, {run.count('skipped')} skipped ({run.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
            runs.append(run)
    rows = summarize(runs[0], runs[1:])
    table = markdown(rows)
    print(table)
    for row, run in zip(rows[1:], runs[1:]):
        for t in row.regressions:
            print(f"regression [{row.label}] {t}: {run.results[t]['reason']}")
    for run in runs[1:]:
        na = sorted({model_of(t) for t, r in run.results.items() if r["outcome"] == "n/a"})
        if na:
            print(f"n/a [{run.label}]: {', '.join(na)}")
    for t, r in sorted(runs[0].results.items()):
        if r["outcome"] == "failed":
            print(f"baseline failure {t}: {r['reason']}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timm": timm.__version__, "torch": torch.__version__, "models": models,
                       "tests": tests, "runs": [dataclasses.asdict(r) for r in runs]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
