"""Mutation-testing benchmark: how many one-line breaks of methods/, codecs/ and runtime/ a fast test subset catches.

Runs mutmut (pinned in requirements-dev.txt) in a scratch copy of the tree, never in the working
tree: the copy gets src/, the fast test files below and pyproject.toml with a ``[tool.mutmut]``
section. Writes ``benchmarks/results/mutants.json`` with killed / survived / timeout / total per
package and per file, exactly which files, mutants and tests were run, and every surviving mutant
with its diff and a classification:

* ``equivalent``: the mutant cannot change any behaviour (a rule of :func:`classify` says why);
* ``message``: it only changes the wording of an error message (case, or an ``XX`` wrapper);
* ``live``: a real behaviour change that no test caught.

The target (issue 14) is at least 90% of the non-equivalent mutants killed in methods/ and codecs/,
i.e. ``killed / (total − equivalent − message)``.

    make mutants                                   # the default files (what fits 2 cores in ~45 min)
    python benchmarks/mutants.py --files 'src/fedsqueeze/codecs/*.py' --sample 0.25
    python benchmarks/mutants.py --all             # every file of the three packages (hours)
    python benchmarks/mutants.py --files src/fedsqueeze/methods/robust.py \
        --tests tests/test_strategies.py --section robust   # one module against its own tests

``--section NAME`` stores the report under ``sections.NAME`` of the JSON and keeps everything else
in it (the default files' report at the top level, other sections); a run without it replaces the
top level and keeps the sections.

Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("methods", "codecs", "runtime")
DEFAULT_FILES = [
    "src/fedsqueeze/methods/tensor.py",
    "src/fedsqueeze/methods/fedpm.py",
    "src/fedsqueeze/methods/deltamask.py",
    "src/fedsqueeze/methods/mask_method.py",
    "src/fedsqueeze/methods/mask_wire.py",
    "src/fedsqueeze/methods/updates.py",
    "src/fedsqueeze/methods/weights.py",
    "src/fedsqueeze/codecs/framing.py",
    "src/fedsqueeze/codecs/qsgd.py",
    "src/fedsqueeze/codecs/sign.py",
    "src/fedsqueeze/codecs/topk.py",
    "src/fedsqueeze/codecs/positions.py",
    "src/fedsqueeze/runtime/common.py",
    "src/fedsqueeze/runtime/checkpoint.py",
]
# fast tests only: no Flower, no `slow` marker, no fuzzing (hypothesis would run for every codec mutant)
TESTS = [
    "tests/test_pinned_methods.py",
    "tests/test_pinned_codecs.py",
    "tests/test_framing.py",
    "tests/test_codecs.py",
    "tests/test_mask_codecs.py",
    "tests/test_link.py",
    "tests/test_treeio.py",
    "tests/test_pinned_runtime.py",
]
HELPERS = ["tests/conftest.py", "tests/handmade.py", "tests/fuzzing.py"]
# end-to-end runs rebuild a task (~10 s) inside every mutant's test run: too slow for this loop
DESELECT = [
    "tests/test_pinned_methods.py::test_round_record_bytes_and_accuracy_recount",
    "tests/test_link.py::test_halving_uplink_bandwidth_adds_the_uplink_transfer_time",
    "tests/test_link.py::test_dropped_clients_are_not_waited_for",
]
KILLED = {"killed"}
TIMEOUT = {"timeout"}

# Survivors reviewed by hand and found equivalent: (regex on the removed line, regex on the added line, why).
EQUIVALENT = [
    (r'\.(en|de)code\("ascii"\)', r'\.(en|de)code\("ASCII"\)', "Python looks codec names up case-insensitively"),
    (r'\.cast\("B"\)', r'\.cast\("b"\)', "signed or unsigned bytes: slicing, bytes() and crc32 see the same bytes"),
    (r"allow_nan=False", r"allow_nan=None", "None is falsy: json.dumps treats it as False"),
    (r"unpack_from\(view, 0\)", r"unpack_from\(view, \)", "0 is unpack_from's default offset"),
    (
        r'struct\.pack\("<I", len\(meta_b\)\)',
        r'struct\.pack\("<i", len\(meta_b\)\)',
        "the meta is at most 1 MiB: signed and unsigned 32-bit packs give the same bytes",
    ),
    (
        r'struct\.pack\("<Q", len\(body\)\)',
        r'struct\.pack\("<q", len\(body\)\)',
        "a body is shorter than 2**63 bytes: signed and unsigned 64-bit packs give the same bytes",
    ),
    (r"str\(exc\)\[:200\]", r"str\(exc\)\[:201\]", "one more character of a quoted library message"),
    (r"replace=False\)", r"replace=None\)", "None is falsy: numpy's choice treats it as False"),
    (
        r'seed_for\(SERVER, "downlink"\)|encode_tensors\(self\.down_codec, state\["weights"\], CodecContext',
        r".",
        "no weight codec (raw, zstd, fp16, sz3) draws from the seed, and decoders read theirs from the header",
    ),
    (r"decode_mask\(meta\.get\(\"mask\"\), mask_body, state, ctx\)", r"state, None\)", "no decode_mask reads the round context"),
    (
        r"sym\.astype\(np\.float32\) / np\.float32\(levels\)",
        r"sym\.astype\(None\)",
        "an unsigned integer array divided by a float32 is float32 anyway",
    ),
    (r"if k == 0 or n == 0:", r"if k == 0 and n == 0:", "with k = 0 or n = 0 the general path also returns n zeros"),
    (r"if n <= 0 or n >= universe:", r"n > universe", "C(u, u) = 1: the formula gives 0 bits too"),
    (
        r"if self\.opts\.error_feedback else a\.reshape\(-1\)\.astype\(np\.float32\)",
        r"or True else|astype\(None\)|reshape\(None\)|reshape\(-2\)",
        "without error feedback the residual is empty: the same values, flattened, in any float dtype",
    ),
    (r"np\.clip\(theta, 0, 1\)", r"np\.clip\(theta, 0, None\)", "(α − 1)/(α + β − 2) never exceeds 1"),
    (
        r"counts = np\.zeros\(self\.n, dtype=np\.int32\)",
        r"counts = np\.zeros\(self\.n, \)",
        "the counts are small integers: exact in float64 too, and cast to uint8 on the way out",
    ),
]
EQUIVALENT += [
    (r"reshape\(-1", r"reshape\(-2", "numpy reads any negative dimension as 'infer this one'"),
    (r'einsum\("(ij,ij->i|i,i->)"', r'einsum\("(IJ,IJ->I|I,I->)"', "einsum subscripts are any letters, upper case too"),
    (r"sorted=False\)", r"sorted=True\)|count, \)", "the indices are sorted right after"),
    (r"np\.arange\(p\.size, dtype=np\.int64\)", r"np\.arange\(p\.size, (dtype=None)?\)", "numpy's default integer is int64 here"),
    (
        r"all_gaps = np\.concatenate\(gaps\) if gaps else np\.zeros\(0, np\.uint32\)",
        r".",
        "the empty-branch array is never used: with no gaps nothing is compressed",
    ),
    (
        r"if total else np\.zeros\(0, np\.uint32\)",
        r"if total else np\.zeros\((None|1), np\.uint32\)|np\.uint32, None\) if total",
        "with no positions the gaps are never read; a shape of None keeps the 1-D shape",
    ),
]
EQUIVALENT += [  # methods/robust.py (strategies_rules section)
    (r"\.astype\(np\.float64\)", r"\.astype\(None\)", "astype(None) converts to float64, numpy's default dtype"),
    (r"np\.zeros\(\(k, k\), dtype=np\.float64\)", r"np\.zeros\(\(k, k\), (dtype=None)?\)", "np.zeros' default dtype is float64"),
    (
        r"nearest = min\(max\(1, k - f - 2\), max\(k - 1, 0\)\)",
        r"max\(k \+ 1, 0\)|max\(k - 1, 1\)",
        "for k >= 2 the bound k - 1 >= max(1, k - f - 2) never binds, and for k = 1 there is no other delta to sum",
    ),
    (r"combined, _ = weighted_mean\(rule,", r"weighted_mean\(None,", "weighted_mean never reads its rule argument"),
    (r'kind="stable"', r'kind="STABLE"', "numpy reads a sort kind case-insensitively"),
    (
        r"if dist > 0 else 1\.0",
        r"if dist > 0 else 2\.0",
        "a delta at distance 0 from the centre adds s·0 whatever its scale s, and s >= 1 is not counted as clipped",
    ),
    (r"blocks, \[1\] \* k,", r"blocks, \[2\] \* k,", "equal counts: n/Σn is the same float64 weight for any common count"),
]
MESSAGE_ONLY = [  # arguments that only label an error message
    (r'"client update"\)|"server message"\)', r"None\)"),
]


def classify(removed: str, added: str) -> tuple[str, str]:
    """``(class, reason)`` of one surviving mutant from its removed and added source line."""
    for old_re, new_re, why in EQUIVALENT:
        if re.search(old_re, removed) and re.search(new_re, added):
            return "equivalent", why
    for old_re, new_re in MESSAGE_ONLY:
        if re.search(old_re, removed) and re.search(new_re, added):
            return "message", "only the label inside an error message"
    old_s, new_s = re.findall(r'"([^"]*)"', removed), re.findall(r'"([^"]*)"', added)
    if len(old_s) == len(new_s) and old_s != new_s and re.sub(r'"[^"]*"', '""', removed) == re.sub(r'"[^"]*"', '""', added):
        # prose (a space in it) only changed in case or wrapped in XX: the wording of a message
        if all(o == n or (" " in o and n in (o.upper(), o.lower(), f"XX{o}XX")) for o, n in zip(old_s, new_s)):
            return "message", "only the wording or case of an error message"
    if "raise" in removed and re.search(r"Error\(None\)", added):
        return "live", "the error message is lost"
    return "live", ""


def source_modules(work: Path) -> dict[str, str]:
    """Module name → source path of every file of the copy."""
    sources = sorted(str(p.relative_to(work)) for p in (work / "src").rglob("*.py"))
    return {p[len("src/") : -len(".py")].replace("/", ".").removesuffix(".__init__"): p for p in sources}


def package_of(path: str) -> str:
    parts = Path(path).parts
    return parts[2] if len(parts) > 3 and parts[2] in PACKAGES else "other"


def module_of(name: str, modules: dict[str, str]) -> str | None:
    """The source file of a mutant name such as ``fedsqueeze.codecs.qsgd.xǁQSGDCodecǁencode__mutmut_3``."""
    best = None
    for mod in modules:
        if name.startswith(mod + ".") and (best is None or len(mod) > len(best)):
            best = mod
    return modules.get(best) if best else None


def mutmut(work: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe), *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"mutmut {' '.join(args[:2])} failed with exit code {proc.returncode}")
    return proc


def prepare(work: Path, files: list[str], rev: str, tests: list[str]) -> None:
    """A scratch copy of commit ``rev`` (src/, the test subset, pyproject.toml) plus the mutmut section.

    A commit, not the working tree: other work in progress never leaks into the measurement, and the
    JSON names exactly what was mutated.
    """
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", rev, "src", "pyproject.toml", *tests, *HELPERS], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    write_config(work, files, tests)


def write_config(work: Path, files: list[str], tests: list[str]) -> None:
    """``pyproject.toml`` of the copy (and of mutmut's own copy, once it exists) with a ``[tool.mutmut]`` section."""
    toml_list = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
    pytest_args = ["-q", "-x"] + [f"--deselect={d}" for d in deselected(tests)]
    section = (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {toml_list(files)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        f"pytest_add_cli_args = {toml_list(pytest_args)}\n"
        "use_git_change_detection = false\n"
    )
    base = (work / "pyproject.toml").read_text().split("\n[tool.mutmut]\n")[0]
    for target in (work / "pyproject.toml", work / "mutants" / "pyproject.toml"):
        if target.parent.exists():
            target.write_text(base + section)


def deselected(tests: list[str]) -> list[str]:
    """The DESELECT entries of the test files in use."""
    return [d for d in DESELECT if d.split("::")[0] in tests]


def write_report(out: Path, report: dict, section: str | None) -> None:
    """Write ``report`` to ``out``: as its top level (keeping its sections), or as ``sections[section]``."""
    old = json.loads(out.read_text()) if out.is_file() else {}
    sections = old.get("sections", {})
    if section:
        doc = {k: v for k, v in old.items() if k != "sections"}
        sections[section] = report
    else:
        doc = report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**doc, "sections": sections}, indent=1, ensure_ascii=False) + "\n")


def snapshot(rev: str) -> dict[str, object]:
    """Which commit was mutated, and when the copy was taken."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    return {"commit": commit, "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def results(work: Path, env: dict) -> dict[str, str]:
    out = mutmut(work, "results", "--all", "true", env=env).stdout
    status = {}
    for line in out.splitlines():
        if ": " in line:
            name, st = line.strip().rsplit(": ", 1)
            status[name] = st
    return status


DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
out = {}
for name in json.load(sys.stdin):
    try:
        out[name] = get_diff_for_mutant(name)
    except Exception as exc:  # noqa: BLE001
        out[name] = f"? {exc}"
print(json.dumps(out))
"""


def diffs_of(work: Path, names: list[str], env: dict) -> dict[str, tuple[str, str]]:
    """``name: (removed lines, added lines)`` of each mutant, from one in-process mutmut call (``mutmut show`` each costs ~1 s)."""
    proc = subprocess.run(
        [sys.executable, "-c", DIFFS], cwd=work, env=env, input=json.dumps(names), capture_output=True, text=True, check=True
    )
    out = {}
    for name, text in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        removed = [line[1:] for line in text.splitlines() if line.startswith("-") and not line.startswith("---")]
        added = [line[1:] for line in text.splitlines() if line.startswith("+") and not line.startswith("+++")]
        out[name] = ("\n".join(removed), "\n".join(added))
    return out


def confirm_survivors(work: Path, status: dict[str, str], tests: list[str], env: dict) -> dict[str, str]:
    """Run ``tests`` against each survivor (and each mutant mutmut found no test for) directly.

    mutmut runs a mutant only against the tests its stats run saw calling the function, and a function
    called while a module is imported (a factory building a table of closures, such as
    server_opt._adaptive) is mapped to whichever test happened to import it first, or to none. A
    survivor that fails the whole selection run with ``MUTANT_UNDER_TEST`` set is counted as killed
    (``status`` is updated); the reason is returned per mutant. The unmutated run must pass first.
    """
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, *[f"--deselect={d}" for d in deselected(tests)]]
    clean = subprocess.run(cmd, cwd=work / "mutants", env=env, capture_output=True, text=True)
    if clean.returncode != 0:
        raise SystemExit(f"--confirm-survivors: the tests fail without a mutant:\n{clean.stdout[-3000:]}")
    out = {}
    for name, st in sorted(status.items()):
        if st not in ("survived", "no tests"):
            continue
        try:
            proc = subprocess.run(
                cmd, cwd=work / "mutants", env={**env, "MUTANT_UNDER_TEST": name}, capture_output=True, text=True, timeout=600
            )
            failed = proc.returncode == 1  # 1: tests failed (2-5: interrupted, usage, no tests collected)
        except subprocess.TimeoutExpired:
            failed = True  # as mutmut counts a timeout
        if failed:
            status[name] = "killed"
            out[name] = f"was {st!r}: fails the whole test selection run directly (mutmut's test map missed the function)"
    return out


def summarize(rows: list[dict]) -> dict[str, float | int]:
    count = lambda pred: sum(1 for r in rows if pred(r))  # noqa: E731
    killed = count(lambda r: r["status"] in KILLED)
    equivalent = count(lambda r: r.get("class") == "equivalent")
    message = count(lambda r: r.get("class") == "message")
    out = {
        "total": len(rows),
        "killed": killed,
        "survived": count(lambda r: r["status"] == "survived"),
        "timeout": count(lambda r: r["status"] in TIMEOUT),
        "no_tests": count(lambda r: r["status"] == "no tests"),
        "other": count(lambda r: r["status"] not in KILLED | TIMEOUT | {"survived", "no tests"}),
        "equivalent": equivalent,
        "message_only": message,
    }
    live = len(rows) - equivalent - message
    # a timeout is a caught mutant (the tests noticed an endless loop), as mutmut itself counts it
    out["killed_fraction_of_non_equivalent"] = round((killed + out["timeout"]) / live, 4) if live else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", help="globs of source files to mutate (default: a fixed list that fits 2 cores)")
    ap.add_argument("--all", action="store_true", help="every .py file of methods/, codecs/ and runtime/")
    ap.add_argument("--sample", type=float, default=1.0, help="fraction of the mutants to run (deterministic by --seed)")
    ap.add_argument(
        "--sample-file",
        nargs=2,
        action="append",
        default=[],
        metavar=("GLOB", "FRACTION"),
        help="a different fraction for the files matching GLOB (repeatable)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (default 1: a shared 2-core machine)")
    ap.add_argument("--workdir", default="/tmp/fedsqueeze-mutants")
    ap.add_argument("--rev", default="HEAD", help="the commit whose source and tests are mutated and run")
    ap.add_argument(
        "--test-rev",
        nargs=2,
        action="append",
        default=[],
        metavar=("PATH", "REV"),
        help="with --recheck: take this test file from another commit, or from a local file, "
        "when the tests of --rev no longer fit the mutated source",
    )
    ap.add_argument("--tests", nargs="+", help="test files to run against the mutants (default: the fast subset TESTS)")
    ap.add_argument(
        "--confirm-survivors",
        action="store_true",
        help="re-run every survivor against the whole test selection (mutmut maps import-time calls to no test)",
    )
    ap.add_argument("--confirm-tests", nargs="+", help="with --confirm-survivors: these test files instead of the whole selection")
    ap.add_argument("--section", help="store the report under sections.SECTION of --out, keeping the rest of it")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/mutants.json"))
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="reuse --workdir's mutants (same source snapshot), take the tests of commit --rev and "
        "re-run only the mutants not yet killed (after adding tests for survivors)",
    )
    args = ap.parse_args()

    files = args.files or DEFAULT_FILES
    tests = args.tests or TESTS
    if args.all:
        files = [f"src/fedsqueeze/{p}/*.py" for p in PACKAGES]
    work = Path(args.workdir)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    t0 = time.time()
    history: list[dict] = []
    tests_commit = None
    test_commits: dict[str, str] = {}
    previous_fractions: dict[str, float] = {}
    if args.recheck:
        previous = json.loads((work / "report.json").read_text())
        previous_fractions = previous.get("sample_by_file", {})
        tests = args.tests or previous.get("tests", TESTS)
        files, history = (
            previous["files"],
            previous.get("history", [])
            + [{k: previous.get(k) for k in ("command", "snapshot", "tests_commit", "mutants_run", "seconds", "counts")}],
        )
        tests_commit = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        overrides = dict(args.test_rev)
        test_commits = {t: overrides.get(t, tests_commit) for t in tests + HELPERS}
        for t in tests + HELPERS:  # the tests of commit --rev; the mutants/ copy is what mutmut runs
            rev = test_commits[t]
            text = (
                Path(rev).read_bytes()
                if Path(rev).is_file()
                else subprocess.run(["git", "show", f"{rev}:{t}"], cwd=ROOT, capture_output=True, check=True).stdout
            )
            if Path(rev).is_file():
                import hashlib

                test_commits[t] = f"{rev} (a local file, sha256 {hashlib.sha256(text).hexdigest()[:16]})"
            for dest in (work / t, work / "mutants" / t):
                dest.write_bytes(text)
        write_config(work, files, tests)
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # re-map tests to functions
    else:
        prepare(work, files, args.rev, tests)
        (work / "snapshot.json").write_text(json.dumps(snapshot(args.rev)))
    version = mutmut(work, "--version", env=env).stdout.strip()
    names: list[str] = []
    fractions: dict[str, float] = {}
    if args.recheck:
        names = sorted(n for n, st in results(work, env).items() if st not in KILLED | {"not checked"})
        if not names:
            raise SystemExit("nothing to re-check: every mutant is killed")
    elif args.sample < 1.0 or args.sample_file:
        # generate the mutants and the test map without running any mutant, then pick a sample per file
        mutmut(work, "run", "--max-children", str(args.max_children), "no-such-mutant", check=False, env=env)
        modules = source_modules(work)
        by_file: dict[str, list[str]] = {}
        for name in sorted(results(work, env)):
            by_file.setdefault(module_of(name, modules) or "?", []).append(name)
        rng = random.Random(args.seed)
        for path, group in sorted(by_file.items()):
            frac = next((float(f) for g, f in args.sample_file if fnmatch.fnmatch(path, g)), args.sample)
            names += sorted(rng.sample(group, max(1, round(frac * len(group))))) if frac < 1 else group
            fractions[path] = frac
    mutmut(work, "run", "--max-children", str(args.max_children), *names, env=env)
    # mutants outside the sample stay "not checked"; a re-check keeps the earlier run's sample
    status = {n: st for n, st in results(work, env).items() if st != "not checked"}
    confirmed = confirm_survivors(work, status, args.confirm_tests or tests, env) if args.confirm_survivors else {}

    modules = source_modules(work)
    rows = []
    diffs = diffs_of(work, sorted(n for n, st in status.items() if st == "survived"), env)
    for name, st in sorted(status.items()):
        path = module_of(name, modules) or "?"
        row = {"mutant": name, "file": path, "package": package_of(path), "status": st}
        if name in confirmed:
            row["confirmed"] = confirmed[name]
        if st == "survived":
            removed, added = diffs[name]
            row["class"], row["reason"] = classify(removed, added)
            row["removed"], row["added"] = removed, added
        rows.append(row)

    by_file = {f: summarize([r for r in rows if r["file"] == f]) for f in sorted({r["file"] for r in rows})}
    by_pkg = {p: summarize([r for r in rows if r["package"] == p]) for p in PACKAGES if any(r["package"] == p for r in rows)}
    report = {
        "tool": version,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "snapshot": json.loads((work / "snapshot.json").read_text()),
        "history": history,
        "rechecked": len(names) if args.recheck else 0,
        "tests_commit": tests_commit or json.loads((work / "snapshot.json").read_text())["commit"],
        "test_file_commits": {t: c for t, c in test_commits.items() if c != tests_commit},
        "files": files,
        "files_with_mutants": sorted(by_file),
        "tests": tests,
        "deselected": deselected(tests),
        "sample": args.sample,
        "sample_by_file": fractions or previous_fractions,
        "seed": args.seed,
        "mutants_run": len(rows),
        "seconds": round(time.time() - t0, 1),
        "counts": {st: sum(1 for r in rows if r["status"] == st) for st in sorted({r["status"] for r in rows})},
        "confirmed_killed": len(confirmed),
        "packages": by_pkg,
        "by_file": by_file,
        "survivors": [r for r in rows if r["status"] == "survived"],
        "not_killed_other": [r for r in rows if r["status"] not in KILLED | {"survived"}],
    }
    text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    (work / "report.json").write_text(text)
    write_report(Path(args.out), report, args.section)
    for pkg, s in by_pkg.items():
        print(
            f"{pkg:8s} killed {s['killed']:4d}  survived {s['survived']:4d}  timeout {s['timeout']:3d}  total {s['total']:4d}"
            f"  (equivalent {s['equivalent']}, message-only {s['message_only']};"
            f" caught {s['killed_fraction_of_non_equivalent']} of the rest)"
        )
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
