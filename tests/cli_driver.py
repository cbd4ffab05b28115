"""Drive ``fedsqueeze.cli.main`` over many argument lists in one process (start-up once, not per case).

Usage: ``python tests/cli_driver.py '[["run", "--method", "nosuch"], ...]'``; prints a JSON list of
``{argv, code, stderr}``. A case may also be ``{"argv": [...], "missing_wordnet": true}``: that case
runs as on a machine without the Debian wordnet package (the source points at a missing file). An exception escaping ``main`` is recorded as code "exception" with its
traceback in stderr. Each case's stderr is what reached file descriptor 2 while it ran (sys.stderr,
logging handlers and C code alike), as a user's terminal would show it. FAKE_MISSING_WORDNET=1 makes
every case a missing-wordnet one.
"""

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import fedsqueeze.data.sources as sources
from fedsqueeze.cli import main

MISSING = (Path("/nonexistent/wordnet/data.noun"),)
if os.environ.get("FAKE_MISSING_WORDNET"):
    sources.load_wordnet.__defaults__ = MISSING


def drive(case: list[str] | dict) -> dict:
    """Run one case in this process; its argv, exit code and everything it wrote to fd 2."""
    argv, defaults = (case["argv"], sources.load_wordnet.__defaults__) if isinstance(case, dict) else (case, None)
    if isinstance(case, dict) and case.get("missing_wordnet"):
        sources.load_wordnet.__defaults__ = MISSING
    try:
        return _drive(argv)
    finally:
        if defaults is not None:
            sources.load_wordnet.__defaults__ = defaults


def _drive(argv: list[str]) -> dict:
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        sys.argv = ["fedsqueeze", *argv]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - a traceback is exactly what the test looks for
            traceback.print_exc()
            code = "exception"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return {"argv": argv, "code": code, "stderr": captured.read().decode(errors="replace")}


print(json.dumps([drive(case) for case in json.loads(sys.argv[1])]))
