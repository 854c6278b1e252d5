"""The README's usage lines name only options that the scripts' --help has (so they cannot drift)."""
import contextlib
import importlib
import io
import os
import re

import pytest

from conftest import ROOT


def usage_blocks():
    """{script: set of --options} from the README's indented `python SCRIPT.py ...` lines and
    their indented continuation lines."""
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    found, script = {}, None
    for line in lines:
        m = re.match(r"\s{4}python ((?:tools/)?\w+)\.py\b(.*)", line)
        if m:
            script = m.group(1)
            found.setdefault(script, set()).update(re.findall(r"--[a-z][a-z-]*", m.group(2)))
        elif script and re.match(r"\s{8,}\[", line):
            found[script].update(re.findall(r"--[a-z][a-z-]*", line))
        else:
            script = None
    return found


@pytest.mark.parametrize("script, options", sorted(usage_blocks().items()))
def test_readme_usage_matches_help(script, options):
    module = importlib.import_module(script.replace("/", "."))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    missing = sorted(o for o in options if o not in out.getvalue())
    assert not missing, f"README names {missing} for {script}.py, its --help does not"
