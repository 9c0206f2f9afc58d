"""Make the scripts of each page work offline and together (widget manager, require.js, MathJax 3).

Four fixes, each for something the browser test (``tests/browser``) saw fail:

* **Duplicates.** With Sphinx 7, sphinx-thebe and sphinx-togglebutton's inline settings are emitted twice
  on every page, and the second ``const THEBE_JS_URL`` is a SyntaxError. Keep the first of identical scripts.
* **Where the widget manager's files are.** ``embed-amd.js`` (from ``@jupyter-widgets/html-manager``) finds
  its icon fonts relative to its AMD module id, ``@jupyter-widgets/html-manager/dist/...``, which require.js
  resolves next to the page. A require.js ``paths`` entry sends that id to our vendored copy in
  ``_static/vendor/html-manager``. It is placed right after require.js, so before the bundle runs.
* **MathJax 2 calls with MathJax 3 loaded.** The widget manager typesets widget labels with
  ``MathJax.Hub.Queue(["Typeset", MathJax.Hub, el])``, MathJax 2's API; the book loads MathJax 3, which has
  no ``Hub``, so rendering a widget threw a TypeError. Every object assigned to ``window.MathJax`` (Sphinx's
  configuration, then MathJax 3 itself when it starts) gets a hidden ``Hub`` that forwards to
  ``MathJax.typesetPromise``.
* **Alt text of widget output.** A plot inside a widget (an ``interact`` output) is drawn by the widget
  manager from the stored state, with no ``alt``; it gets one saying what it is (``book/_ext/alt_text.py``
  handles every other image).
"""

from __future__ import annotations

__version__ = "1.0"

WIDGET_MANAGER = "vendor/html-manager/embed-amd.js"
REQUIRE_JS = "vendor/requirejs/require.js"

REQUIRE_PATHS = """\
(function () {
  var root = document.documentElement.dataset.content_root || "./";
  require.config({paths: {"@jupyter-widgets/html-manager/dist":
      new URL(root + "_static/vendor/html-manager", document.baseURI).href}});
})();"""

MATHJAX2_HUB = """\
(function () {
  function typeset(el) {
    var mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise && mj.typesetPromise) {
      mj.startup.promise.then(function () { return mj.typesetPromise(el ? [el] : undefined); });
    }
  }
  var hub = {Queue: function () {
    for (var i = 0; i < arguments.length; i++) {
      var job = arguments[i];
      if (Array.isArray(job) && job[0] === "Typeset") { typeset(job[2]); }
    }
  }};
  function withHub(obj) {
    if (obj && typeof obj === "object" && !obj.Hub) {
      Object.defineProperty(obj, "Hub", {value: hub, enumerable: false, configurable: true});
    }
    return obj;
  }
  var current = withHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {configurable: true, enumerable: true,
      get: function () { return current; }, set: function (value) { current = withHub(value); }});
})();"""


WIDGET_IMAGE_ALT = """\
document.addEventListener("DOMContentLoaded", function () {
  var alt = "Plot drawn by the interactive widget above, in its stored state; "
          + "run the notebook to change it.";
  function label(root) {
    root.querySelectorAll(".jupyter-widgets img:not([alt]), .widget-output img:not([alt])")
        .forEach(function (img) { img.setAttribute("alt", alt); });
  }
  new MutationObserver(function () { label(document); })
      .observe(document.body, {childList: true, subtree: true});
  label(document);
});"""


def _key(script) -> tuple:
    attributes = tuple(sorted((k, str(v)) for k, v in script.attributes.items() if k != "priority"))
    return script.filename or "", attributes  # an inline script comes as None or ""


def fix_page_scripts(app, pagename, templatename, context, doctree) -> None:
    builder = app.builder
    scripts = getattr(builder, "_js_files", None)
    if scripts is None:
        return
    seen, unique = set(), []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique
    require = next((i for i, s in enumerate(scripts) if str(s.filename).endswith(REQUIRE_JS)), None)
    if require is not None and any(str(s.filename).endswith(WIDGET_MANAGER) for s in scripts):
        builder.add_js_file(None, body=REQUIRE_PATHS, priority=scripts[require].priority)
        # Sphinx sorts the scripts by priority, keeping the order of equals: right after require.js it stays
        scripts.insert(require + 1, scripts.pop())
        builder.add_js_file(None, body=MATHJAX2_HUB, priority=1)
        builder.add_js_file(None, body=WIDGET_IMAGE_ALT, priority=1)


def setup(app):
    # after myst-nb (priority 500) has added the widget scripts of the page
    app.connect("html-page-context", fix_page_scripts, priority=900)
    return {"version": __version__, "parallel_read_safe": True, "parallel_write_safe": True}
