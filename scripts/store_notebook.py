"""Execute chapter notebooks in quick mode and store them as nbval expects them.

Usage: python scripts/store_notebook.py notebooks/01_data_and_models.ipynb [...]

Every code cell keeps its execution count (nbval compares only cells that have one). Only the cells whose
output is a claim (marked ``# NBVAL_CHECK_OUTPUT`` or tagged ``nbval-check-output``) keep their outputs:
figures belong in the built book, not in the repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def is_checked(cell) -> bool:
    return "NBVAL_CHECK_OUTPUT" in cell.source or "nbval-check-output" in cell.metadata.get("tags", [])


def store(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ["VEFI_QUICK"] = "1"
    os.environ.setdefault("VEFI_PROGRESS", "off")
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code" and not is_checked(cell):
            cell.outputs = []
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    print(f"stored {path}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        store(Path(arg))
