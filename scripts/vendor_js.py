"""Copy the JavaScript the book serves itself from ``node_modules`` to ``book/_static/vendor``.

Run by ``make vendor`` after ``npm ci``. The built pages load these files instead of a CDN, so widgets and
equations show in a classroom without Internet: the widget manager (``@jupyter-widgets/html-manager``'s AMD
embed bundle and its fonts), require.js (which that bundle needs) and MathJax 3 (its ``tex-mml-chtml``
component plus the extensions, fonts and accessibility files it loads on demand).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "node_modules"
VENDOR = ROOT / "book" / "_static" / "vendor"

# MathJax's other combined components (tex-svg.js, mml-chtml.js, ...) are alternatives to the one we load.
MATHJAX_KEEP = ("tex-mml-chtml.js", "input", "output", "ui", "a11y", "sre", "adaptors")


def _version(package: str) -> str:
    return json.loads((MODULES / package / "package.json").read_text())["version"]


def main() -> int:
    missing = [p for p in ("@jupyter-widgets/html-manager", "requirejs", "mathjax") if not (MODULES / p).is_dir()]
    if missing:
        print(f"vendor_js: {', '.join(missing)} missing from node_modules; run `npm ci` first", file=sys.stderr)
        return 1
    tmp = VENDOR.with_name("vendor.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    widgets = tmp / "html-manager"
    widgets.mkdir(parents=True)
    for f in (MODULES / "@jupyter-widgets/html-manager/dist").iterdir():
        # embed-amd.js finds its fonts next to itself; the ES-module bundle and source maps are not served
        if f.name == "embed-amd.js" or f.suffix in {".woff", ".woff2", ".ttf", ".eot", ".svg"}:
            shutil.copy2(f, widgets / f.name)
    (tmp / "requirejs").mkdir()
    shutil.copy2(MODULES / "requirejs/require.js", tmp / "requirejs/require.js")
    mathjax = tmp / "mathjax"
    mathjax.mkdir()
    for name in MATHJAX_KEEP:
        src = MODULES / "mathjax/es5" / name
        if src.is_dir():
            shutil.copytree(src, mathjax / name)
        elif src.exists():
            shutil.copy2(src, mathjax / name)
    versions = {p: _version(p) for p in ("@jupyter-widgets/html-manager", "requirejs", "mathjax")}
    (tmp / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    shutil.rmtree(VENDOR, ignore_errors=True)
    tmp.rename(VENDOR)
    print("vendored " + ", ".join(f"{p} {v}" for p, v in versions.items()) + f" into {VENDOR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
