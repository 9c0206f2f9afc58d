"""pytest plugin: nbval's execution of each notebook, stored for the book, so that ``make test`` runs it once.

Usage (``make test`` does this)::

    pytest --nbval-lax -p tests.nbval_capture --nbval-store _build/quick/_build/.jupyter_cache notebooks/

nbval runs and checks every notebook as usual. With ``--nbval-store DIR``, each notebook whose cells all passed
is also stored in the jupyter-cache folder DIR, executed: the quick book's build (``make quickbook``,
``execute_notebooks: cache``) then finds it there and merges its outputs (figures, ``glue`` values, widgets)
into the page without running the notebook again. Without the option this plugin does nothing.

How the outputs are taken: nbval reads every message of a cell from the kernel through
``IPyNbFile.get_kernel_message``. This plugin sees the same messages (it wraps that method and
``RunningKernel.execute_cell_input``, which returns the cell's message id) and hands those of the running cell
to ``nbclient.NotebookClient.process_message``, the code jupyter-book's own execution runs. So the stored
notebook is the one jupyter-book would have produced: outputs in order, ``clear_output`` and display updates
applied, ipywidgets' state in the notebook metadata ``widgets``, and what an ``Output`` widget (as in
``interact``) captured inside that widget. nbval's comparison is untouched: it compares the outputs it collected
itself with the notebook file (never with what this plugin builds).

Cells the book would not execute keep what the notebook file holds, as in the book: cells tagged
``skip-execution`` (nbval runs them: their outputs are dropped from the stored copy), empty cells, and cells
nbval skips (``nbval-skip``, ``# NBVAL_SKIP``; these are listed in the summary, since the book would run them).
A notebook with a failed, timed-out or deselected cell is not stored (the book would execute it itself); after a
failure its earlier execution, if the cache holds one, is removed too.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionComplete
from nbval.plugin import IPyNbCell

SKIP_EXECUTION = "skip-execution"  # nbclient's (and so jupyter-book's) tag for cells it does not run


def pytest_addoption(parser):
    parser.getgroup("nbval").addoption(
        "--nbval-store", metavar="DIR", default=None,
        help="store every notebook that passed, executed as nbval ran it, in the jupyter-cache folder DIR "
             "(the book's execution cache, e.g. _build/quick/_build/.jupyter_cache)")


def pytest_configure(config):
    folder = config.getoption("nbval_store")
    if folder:
        if not (config.option.nbval or config.option.nbval_lax):
            raise pytest.UsageError("--nbval-store stores nbval's executions: it needs --nbval or --nbval-lax")
        config.pluginmanager.register(NotebookStore(Path(folder)), "nbval-store")


class NotebookRun:
    """One notebook as nbval runs it: an nbclient-built executed copy, fed with nbval's kernel messages."""

    def __init__(self, nbfile):
        self.path = Path(nbfile.path)
        self.source = nbfile.nb
        # a copy: nbval compares its outputs with nbfile.nb's cells, which must stay as read from the file
        self.nb = copy.deepcopy(nbfile.nb)
        self.position = {id(cell): i for i, cell in enumerate(nbfile.nb.cells)}
        self.expected = {i for i, cell in enumerate(self.nb.cells) if cell.cell_type == "code"}
        self.done: set[int] = set()
        self.not_run: list[int] = []  # cells nbval skipped: the book would run them
        self.failed = False
        self.started = time.perf_counter()
        # record_timing=False: as jupyter-cache executes (and cell metadata is part of the cache key)
        self.client = NotebookClient(self.nb, record_timing=False)
        self.client.kc = nbfile.kernel.kc  # an Output widget sends its state back to the kernel, as nbclient does
        self.index: int | None = None
        self.msg_id: str | None = None

        kernel, receive = nbfile.kernel, nbfile.get_kernel_message

        def execute_cell_input(cell_input, allow_stdin=None):
            # nbval's call, but with store_history=True as in Jupyter and nbclient: without history IPython
            # ignores a cell's trailing ';' (it looks at the last stored input), and the page would show
            # values such as "<matplotlib.image.AxesImage at 0x...>" that the book never shows
            self.msg_id = kernel.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin,
                                            stop_on_error=False)
            return self.msg_id

        def get_kernel_message(*args, **kwargs):
            msg = receive(*args, **kwargs)
            self.process(msg)
            return msg

        kernel.execute_cell_input = execute_cell_input
        nbfile.get_kernel_message = get_kernel_message

    def begin(self, item) -> None:
        self.index = self.position[id(item.cell)]
        self.msg_id = None
        self.nb.cells[self.index].outputs = []
        self.client.clear_before_next_output = False

    def process(self, msg) -> None:
        # as nbclient: only the messages of the running cell count
        if self.index is None or self.msg_id is None or msg["parent_header"].get("msg_id") != self.msg_id:
            return
        try:
            self.client.process_message(msg, self.nb.cells[self.index], self.index)
        except CellExecutionComplete:
            pass

    def end(self, outcome: str) -> None:
        index, self.index, self.msg_id = self.index, None, None
        cell, source = self.nb.cells[index], self.source.cells[index]
        if outcome == "failed":
            self.failed = True
        elif outcome == "skipped":
            self.not_run.append(index)
            self.nb.cells[index] = copy.deepcopy(source)
        elif not cell.source.strip() or SKIP_EXECUTION in cell.metadata.get("tags", []):
            self.nb.cells[index] = copy.deepcopy(source)  # nbclient leaves these cells as they are
        else:
            self.client.code_cells_executed += 1  # nbclient numbers the executed cells 1, 2, ...
            cell.execution_count = self.client.code_cells_executed
            for output in cell.outputs:  # the kernel also counted the cells nbclient leaves out
                if output.output_type == "execute_result":
                    output.execution_count = cell.execution_count
        self.done.add(index)

    @property
    def complete(self) -> bool:
        return not self.failed and self.done == self.expected

    def store(self, folder: Path) -> None:
        self.client.set_widgets_metadata()
        get_cache(str(folder)).cache_notebook_bundle(
            CacheBundleIn(self.nb, str(self.path.resolve()),
                          data={"execution_seconds": time.perf_counter() - self.started}),
            check_validity=False, overwrite=True)


    def forget(self, folder: Path) -> None:
        cache = get_cache(str(folder))
        try:
            cache.remove_cache(cache.match_cache_notebook(self.source).pk)
        except KeyError:
            pass


class NotebookStore:
    """The plugin: follows nbval's cells and stores each notebook whose cells all passed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.runs: dict[object, NotebookRun] = {}
        self.stored: list[Path] = []
        self.not_stored: list[tuple[Path, str]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        if not isinstance(item, IPyNbCell):
            yield
            return
        run = self.runs.get(item.parent)
        if run is None:  # the kernel is started by the notebook's setup, before its first cell's call
            run = self.runs[item.parent] = NotebookRun(item.parent)
        run.begin(item)
        result = yield
        if result.excinfo is None:
            run.end("passed")
        elif isinstance(result.excinfo[1], pytest.skip.Exception) and item.options.get("skip"):
            run.end("skipped")
        else:
            run.end("failed")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item, nextitem):
        """After a notebook's last cell, before nbval stops its kernel."""
        if not isinstance(item, IPyNbCell) or (nextitem is not None and nextitem.parent is item.parent):
            return
        run = self.runs.pop(item.parent, None)
        if run is None:
            self.not_stored.append((Path(item.parent.path), "no cell ran"))
        elif not run.complete:
            reason = "a cell failed" if run.failed else "not every cell ran (deselected?)"
            if run.failed:  # no earlier execution of this code may stand in for it in the book
                run.forget(self.folder)
                reason += " (its earlier execution, if any, was removed from the cache)"
            self.not_stored.append((run.path, reason))
        else:
            run.store(self.folder)
            self.stored.append(run.path)
            if run.not_run:
                self.not_stored.append((run.path, f"stored, but nbval skipped code cells {run.not_run}: "
                                                  "the book shows their stored outputs"))

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        changed = [path for path in self.stored if not _in_cache(path, self.folder)]
        write(f"nbval-store: {len(self.stored)} executed notebook(s) stored in {self.folder} for the book")
        for path, reason in self.not_stored:
            write(f"nbval-store: {path.name}: {reason}")
        for path in changed:
            write(f"nbval-store: {path.name} changed while nbval ran: the book will execute it again")


def _in_cache(path: Path, folder: Path) -> bool:
    """Whether the notebook file, as it is now, has an execution in the cache (no: edited while nbval ran)."""
    try:
        get_cache(str(folder)).match_cache_notebook(nbformat.read(path, as_version=4))
    except KeyError:
        return False
    return True
