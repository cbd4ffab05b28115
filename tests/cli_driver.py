"""Drive ``fedsqueeze.cli.main`` over many argument lists in one process (start-up once, not per case).

Usage: ``python tests/cli_driver.py '[["run", "--method", "nosuch"], ...]'``; prints a JSON list of
``{argv, code, stderr}``. An exception escaping ``main`` is recorded as code "exception" with its
traceback in stderr. Each case's stderr is what reached file descriptor 2 while it ran (sys.stderr,
logging handlers and C code alike), as a user's terminal would show it. FAKE_MISSING_WORDNET=1 points
the wordnet source at a missing file, as on a machine without the Debian package.
"""

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import fedsqueeze.data.sources as sources
from fedsqueeze.cli import main

if os.environ.get("FAKE_MISSING_WORDNET"):
    sources.load_wordnet.__defaults__ = (Path("/nonexistent/wordnet/data.noun"),)


def drive(argv: list[str]) -> dict:
    """Run ``fedsqueeze ARGV`` in this process; its exit code and everything it wrote to fd 2."""
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


print(json.dumps([drive(argv) for argv in json.loads(sys.argv[1])]))
