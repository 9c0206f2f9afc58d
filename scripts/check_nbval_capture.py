"""Check that tests/nbval_capture.py stores a notebook as jupyter-book's own execution would have produced it.

Usage: python scripts/check_nbval_capture.py [NOTEBOOK ...]

For each notebook (default: a small one written here that uses every kind of output the book relies on: streams
and warnings, ``glue``, a display updated by id, ``clear_output``, ``interact`` and its ``Output`` widget, a
widget, an expression ending in ``;``, an empty cell and a ``skip-execution`` cell), runs nbval with the plugin
into a temporary cache, executes the notebook again the way myst-nb does (jupyter-cache's
``single_nb_execution``), and compares the two: outputs of every code cell, execution counts, and the widget
state. Widget model ids are random, so each model is compared by its state with the models it refers to
expanded; addresses, timings and kernel file names are masked as in notebooks/sanitize.cfg. Exits 1 on any
difference, naming the cell. Book notebooks run in quick mode (VEFI_QUICK=1) and take minutes each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from jupyter_cache.executors.utils import single_nb_execution
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = [
    "import sys, warnings\nimport ipywidgets as widgets\nimport matplotlib.pyplot as plt\nfrom myst_nb import glue\n"
    "from IPython.display import Markdown, clear_output, display",
    "print('out'); print('err', file=sys.stderr); warnings.warn('did not converge')",
    "# NBVAL_CHECK_OUTPUT\nprint('checked')",
    "glue('n', 42)\nglue('fig', plt.figure(figsize=(1, 1)), display=False)\nplt.close('all')",
    "handle = display(Markdown('before'), display_id=True)\nhandle.update(Markdown('after'))",
    "for i in range(3):\n    clear_output(wait=True)\n    print(i)",
    "def show(k):\n    plt.plot([0, k])\n    plt.show()\n    print('k =', k)\n\n"
    "widgets.interact(show, k=widgets.IntSlider(3, 0, 5));",
    "out = widgets.Output()\nwith out:\n    print('inside')\ndisplay(out)\nwidgets.FloatSlider(0.5)",
    "plt.plot([1, 2]);",
    "",
    "print('the book does not run this')",
    "3 + 4",
]


def example_notebook(path: Path) -> None:
    cells = [new_markdown_cell("# nbval_capture check")] + [new_code_cell(src) for src in EXAMPLE]
    for count, cell in enumerate(cells[1:], 1):
        cell.execution_count = count  # nbval compares only cells with a count
    cells[3].outputs = [new_output("stream", name="stdout", text="checked\n")]
    cells[-2].metadata["tags"] = ["skip-execution"]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, path)


def _masked(outputs, expand) -> list:
    text = json.dumps(outputs, sort_keys=True)
    text = re.sub(r'"model_id": "([0-9a-f]{32})"', lambda m: '"model": ' + json.dumps(expand(m.group(1))), text)
    text = re.sub(r"ipykernel_\d+/\d+", "ipykernel_X/Y", text)
    text = re.sub(r"0x[0-9a-fA-F]+", "ADDRESS", text)
    text = re.sub(r"\d+(\.\d+)?\s*(s|ms|sec|seconds|min)\b", "TIME", text)
    return json.loads(text)


def _widgets(nb):
    """The notebook's widget models, and a function giving a model with its references expanded."""
    models = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    memo: dict = {}

    def expand(model_id):
        if model_id not in models:
            return f"missing model {model_id}"
        if model_id not in memo:
            text = re.sub(r'"IPY_MODEL_([0-9a-f]{32})"', lambda m: json.dumps(expand(m.group(1))),
                          json.dumps(models[model_id], sort_keys=True))
            memo[model_id] = json.loads(text)
        return memo[model_id]

    return models, expand


def differences(path: Path) -> list[str]:
    """Where the plugin's stored execution of the notebook differs from myst-nb's own."""
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                              "--nbval-sanitize-with", str(ROOT / "notebooks" / "sanitize.cfg"),
                              "-p", "tests.nbval_capture", "--nbval-store", str(cache_dir), str(path)],
                             cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 0:
            return [f"nbval failed:\n{run.stdout[-3000:]}"]
        cache = get_cache(str(cache_dir))
        stored = cache.get_cache_bundle(cache.match_cache_notebook(nbformat.read(path, as_version=4)).pk).nb
    direct = nbformat.read(path, as_version=4)
    result = single_nb_execution(direct, cwd=str(path.parent), timeout=1800, allow_errors=False)
    if result.err is not None:
        return [f"direct execution failed: {result.exc_string}"]
    code = [cell for cell in direct.cells if cell.cell_type == "code"]
    (stored_models, stored_expand), (direct_models, direct_expand) = _widgets(stored), _widgets(direct)
    found = []
    for index, (a, b) in enumerate(zip(stored.cells, code)):
        left = (a.execution_count, _masked(a.outputs, stored_expand))
        right = (b.execution_count, _masked(b.outputs, direct_expand))
        if left != right:
            found.append(f"code cell {index}:\n  stored {json.dumps(left)[:1200]}\n  direct {json.dumps(right)[:1200]}")
    key = lambda model: json.dumps(model, sort_keys=True)  # noqa: E731
    left = sorted(key(stored_expand(m)) for m in stored_models)
    right = sorted(key(direct_expand(m)) for m in direct_models)
    if left != right:
        found.append(f"widget state: {len(left)} models stored, {len(right)} in the direct execution; first "
                     f"difference: {sorted(set(left) ^ set(right))[0][:1200]}")
    return found


def main(argv: list[str]) -> int:
    os.environ.setdefault("VEFI_QUICK", "1")
    os.environ.setdefault("VEFI_PROGRESS", "off")
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(a).resolve() for a in argv]
        if not paths:
            paths = [Path(tmp) / "example.ipynb"]
            example_notebook(paths[0])
        for path in paths:
            found = differences(path)
            print(f"{path.name}: " + ("same as myst-nb's execution" if not found else "DIFFERENT"))
            for line in found:
                print("  " + line)
            status |= bool(found)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
