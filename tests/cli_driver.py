"""Drive ``fedsqueeze.cli.main`` over many argument lists in one process (start-up once, not per case).

Prints a JSON list of {argv, code, stderr}. FAKE_MISSING_WORDNET=1 points the wordnet source at a
missing file, as on a machine without the Debian package.
"""
import contextlib, io, json, sys, traceback
from pathlib import Path
import fedsqueeze.data.sources as sources
from fedsqueeze.cli import main
import os
if os.environ.get("FAKE_MISSING_WORDNET"):
    sources.load_wordnet.__defaults__ = (Path("/nonexistent/wordnet/data.noun"),)
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err):
        sys.argv = ["fedsqueeze", *argv]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "exception"
    results.append({"argv": argv, "code": code, "stderr": err.getvalue()})
print(json.dumps(results))
