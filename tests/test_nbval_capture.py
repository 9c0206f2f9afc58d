"""The nbval plugin that feeds the quick book (tests/nbval_capture.py) stores what myst-nb's own execution
would: outputs, execution counts and widget state of a notebook with every kind of output the book uses."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_capture_equals_the_books_own_execution():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_nbval_capture.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "same as myst-nb's execution" in run.stdout
