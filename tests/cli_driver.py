"""Drive ``fedsqueeze.cli.main`` over many argument lists in one process (start-up once, not per case).

Usage: ``python tests/cli_driver.py '[["run", "--method", "nosuch"], ...]'``; prints a JSON list of
``{argv, code, stderr}``. An exception escaping ``main`` is recorded as code "exception" with its
traceback in stderr. FAKE_MISSING_WORDNET=1 points the wordnet source at a missing file, as on a
machine without the Debian package.
"""

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

import fedsqueeze.data.sources as sources
from fedsqueeze.cli import main

if os.environ.get("FAKE_MISSING_WORDNET"):
    sources.load_wordnet.__defaults__ = (Path("/nonexistent/wordnet/data.noun"),)

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        sys.argv = ["fedsqueeze", *argv]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - a traceback is exactly what the test looks for
            traceback.print_exc()
            code = "exception"
    results.append({"argv": argv, "code": code, "stderr": err.getvalue()})
print(json.dumps(results))
