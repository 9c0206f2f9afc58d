"""The built book, visited in headless Chromium: every page loads offline and shows what it should.

``make test`` builds the book in quick mode (``make quickbook``, into ``_build/quick``) and runs this file with
``VEFI_SITE`` pointing at the HTML. Without ``VEFI_SITE`` the test builds it itself. The site is served on a
free localhost port; Chromium resolves every other host to nothing, so a page that needed a CDN would show a
failed request here. Each page gets a full-page screenshot in ``_build/screenshots/`` for inspection.

Checked on every page reached from the home page by following links: it loads with no SEVERE console
message and no request beyond localhost; every image has a non-zero natural size and a real alt text;
every internal link and anchor resolves; MathJax typeset every equation without error; every embedded
widget view is rendered by the widget manager; no Markdown is left unrendered (a table's ``|---|`` or a
``$...$`` outside code); no printed output is wider than its column; no progress bar reached a page
(stderr is shown, for warnings); every chapter has its download button and no page links to a placeholder
home or a launcher (Binder, Colab) without vefi and its data. Chapter 10's table of claims is an HTML table
with one row per claim of the executed notebook (read from the build's execution cache, next to the HTML).
The offline explorers of chapters 4, 5 and 11 show another precomputed image when a control changes.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make`` installs them when run as root) and selenium
(the ``test`` extra). Skips, saying why, only when Chromium is missing and cannot be installed (not root).
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import posixpath
import re
import shutil
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import nbformat
import pytest
import yaml
from jupyter_cache import get_cache

ROOT = Path(__file__).resolve().parents[2]
QUICK_SITE = ROOT / "_build" / "quick" / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
PAGE_TIMEOUT = 60  # seconds for a page's scripts (MathJax, widgets) to finish


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium():
    browser = _find("chromium", "chromium-browser")
    driver = _find("chromedriver")
    if browser and driver:
        return browser, driver
    missing = " and ".join(p for p, found in (("chromium", browser), ("chromium-driver", driver)) if not found)
    if os.geteuid() == 0:
        pytest.fail(f"{missing} missing although we are root: `make system` installs them "
                    f"(apt-get install chromium chromium-driver)")
    pytest.skip(f"browser test skipped: {missing} not installed and not root to install it; "
                f"run `sudo apt-get install chromium chromium-driver`")


@pytest.fixture(scope="module")
def site() -> Path:
    if os.environ.get("VEFI_SITE"):
        path = Path(os.environ["VEFI_SITE"])
        if not path.is_absolute():
            path = ROOT / path
    else:
        subprocess.run(["make", "--no-print-directory", "quickbook"], cwd=ROOT, check=True)
        path = QUICK_SITE
    hint = "" if shutil.which("npm") else " (npm is missing: `sudo apt-get install nodejs npm`, then `make quickbook`)"
    assert (path / "index.html").is_file(), f"no built book in {path}{hint}"
    assert (path / "_static" / "vendor" / "VERSIONS.json").is_file(), \
        f"the book in {path} has no vendored JavaScript: run `make vendor`{hint}"
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output readable
        pass

    def do_GET(self):
        if self.path == "/favicon.ico":  # Chromium asks for one on its own; the book has none
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def driver(chromium):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # a set-up bug, not a reason to skip
        pytest.fail("selenium is missing: it is in the test extra (`make setup` or pip install -e '.[test]')")

    browser, chromedriver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--hide-scrollbars",
                # offline for real: any host but localhost resolves to nothing
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    drv.set_page_load_timeout(PAGE_TIMEOUT)
    drv.set_script_timeout(PAGE_TIMEOUT)
    try:
        yield drv
    finally:
        drv.quit()


@dataclass
class Page:
    url: str
    console_errors: list = field(default_factory=list)
    outside_requests: list = field(default_factory=list)
    broken_images: list = field(default_factory=list)
    bad_alts: list = field(default_factory=list)
    links: list = field(default_factory=list)
    ids: set = field(default_factory=set)
    math: dict = field(default_factory=dict)
    widgets: dict = field(default_factory=dict)
    external: list = field(default_factory=list)
    dropdowns: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    text: str = ""
    stderr: list = field(default_factory=list)
    overflowing: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    short_titles: list = field(default_factory=list)
    bold_pasted: list = field(default_factory=list)


# Waits for MathJax's first typesetting and for the widget manager to replace each view script by a view.
_SETTLE = """
const done = arguments[arguments.length - 1];
const wait = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const views = () => document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  const rendered = () => document.querySelectorAll('.jupyter-widgets, .widget-interact, .jupyter-widgets-view').length;
  for (let i = 0; i < 100 && views() > 0 && rendered() < views(); i++) { await wait(200); }
  document.querySelectorAll('img').forEach((img) => { img.loading = 'eager'; });
  await Promise.all(Array.from(document.images).filter((i) => !i.complete)
      .map((i) => new Promise((r) => { i.onload = i.onerror = r; })));
  done(true);
})().catch((e) => done(String(e)));
"""

_INSPECT = """
const imgs = Array.from(document.images).map((i) => ({src: i.currentSrc || i.src, w: i.naturalWidth,
    h: i.naturalHeight, alt: i.getAttribute('alt'), visible: i.getClientRects().length > 0}));
const links = Array.from(document.querySelectorAll('a[href]')).map((a) => a.href);
const ids = Array.from(document.querySelectorAll('[id]')).map((e) => e.id)
    .concat(Array.from(document.querySelectorAll('a[name]')).map((e) => e.getAttribute('name')));
const maths = Array.from(document.querySelectorAll('.math'));
const external = Array.from(document.querySelectorAll('a[href]')).map((a) => a.href)
    .filter((h) => h.startsWith('http') && !h.startsWith(location.origin));
const dropdowns = Array.from(document.querySelectorAll('.admonition.dropdown'))
    .map((d) => ({title: (d.querySelector('.admonition-title') || d).textContent.trim().slice(0, 60),
                  hidden: d.classList.contains('toggle-hidden')}));
const tables = Array.from(document.querySelectorAll('article table')).map((t) => ({
    header: Array.from(t.querySelectorAll('thead th')).map((th) => th.textContent.trim()),
    rows: t.querySelectorAll('tbody tr').length}));
// the text a reader sees outside code and typeset math, where Markdown must not show through
const skip = 'pre, code, script, style, textarea, mjx-container, .highlight';
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
const texts = [];
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  if (!n.parentElement.closest(skip)) { texts.push(n.textContent); }
}
const stderr = Array.from(document.querySelectorAll('.output.stderr')).map((e) => e.textContent);
// printed outputs whose end is hidden: wider than the column they sit in
const overflowing = Array.from(document.querySelectorAll('.cell_output pre'))
    .filter((p) => p.scrollWidth > p.clientWidth + 1)
    .map((p) => (p.textContent.split(String.fromCharCode(10)).find((l) => l.trim()) || '').slice(0, 80));
// admonition title bars (exercises, solutions, notes) that stop short of their box's width
const short_titles = Array.from(document.querySelectorAll('.admonition > .admonition-title'))
    .filter((t) => t.getClientRects().length > 0
            && t.getBoundingClientRect().width < 0.95 * t.parentElement.getBoundingClientRect().width)
    .map((t) => t.textContent.trim().slice(0, 60));
// glued text set in another weight than the text around it (MyST-NB's default is bold)
const bold_pasted = Array.from(document.querySelectorAll('span.pasted-text'))
    .filter((t) => getComputedStyle(t).fontWeight !== getComputedStyle(t.parentElement).fontWeight)
    .map((t) => t.textContent.trim().slice(0, 60));
// figures as shown (glued figures, cell outputs, the offline explorers' images): natural width (pixels of the
// PNG) and width on the page
const figures = Array.from(document.querySelectorAll('article figure img, article .cell_output img'))
    .filter((i) => i.getClientRects().length > 0 && i.naturalWidth > 0)
    .map((i) => ({src: (i.currentSrc || i.src).split('/').pop().slice(0, 60), natural: i.naturalWidth,
                  shown: i.getBoundingClientRect().width, alt: (i.getAttribute('alt') || '').slice(0, 60)}));
return {imgs, links, ids, external, dropdowns, tables, stderr, overflowing, figures, short_titles, bold_pasted, text: texts.join(' '),
  math: {elements: maths.length, typeset: maths.filter((m) => m.querySelector('mjx-container')).length,
         errors: document.querySelectorAll('mjx-merror').length, mathjax: !!window.MathJax},
  widgets: {views: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
            state: document.querySelectorAll('script[type="application/vnd.jupyter.widget-state+json"]').length,
            rendered: document.querySelectorAll('.jupyter-widgets, .widget-interact').length}};
"""


def _is_page(url: str, origin: str) -> bool:
    path = urlparse(url).path
    return url.startswith(origin) and (path.endswith(".html") or path.endswith("/"))


def _visit(driver, url: str, origin: str) -> Page:
    page = Page(url)
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(url)
    settled = driver.execute_async_script(_SETTLE)
    assert settled is True, f"{url}: waiting for MathJax and widgets failed: {settled}"
    info = driver.execute_script(_INSPECT)
    page.console_errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            req = msg["params"]["request"]["url"]
            if not req.startswith((origin, "data:", "blob:", "about:")):
                page.outside_requests.append(req)
    for img in info["imgs"]:
        if not (img["w"] > 0 and img["h"] > 0):
            page.broken_images.append(img["src"])
        alt = (img["alt"] or "").strip()
        if not alt or alt.lower().endswith((".png", ".jpg", ".svg", ".gif")):
            page.bad_alts.append((img["src"], img["alt"]))
    page.links = [link for link in info["links"] if link.startswith(origin)]
    page.ids = set(info["ids"])
    page.math = info["math"]
    page.widgets = info["widgets"]
    page.external = info["external"]
    page.dropdowns = info["dropdowns"]
    page.tables = info["tables"]
    page.text = info["text"]
    page.stderr = info["stderr"]
    page.overflowing = info["overflowing"]
    page.figures = info["figures"]
    page.short_titles = info["short_titles"]
    page.bold_pasted = info["bold_pasted"]
    rel = unquote(urlparse(url).path).strip("/") or "index.html"
    shot = SCREENSHOTS / (rel.replace("/", "__").removesuffix(".html") + ".png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    shot.write_bytes(base64.b64decode(data["data"]))
    return page


_REFRESH = re.compile(r"""<meta\s+http-equiv=["']?refresh["']?\s+content=["'][^"']*url=([^"']+)["']""", re.I)


def _redirect(site: Path, url: str) -> str | None:
    """Where a redirect-only page (Jupyter Book's index.html) sends the reader, read from the file: in the
    browser the redirect races with the page's inspection."""
    path = site / unquote(urlparse(url).path).lstrip("/")
    text = path.read_text(errors="replace") if path.is_file() else ""
    match = _REFRESH.search(text) if len(text) < 2000 else None
    return urljoin(url, match.group(1).strip()) if match else None


@pytest.fixture(scope="module")
def crawl(driver, server, site) -> dict[str, Page]:
    """Every page reached from the home page by internal links, visited once."""
    start = urljoin(server, "index.html")
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    pages: dict[str, Page] = {}
    queue = deque([start])
    while queue:
        url = queue.popleft()
        if url in pages:
            continue
        target = _redirect(site, url)
        if target is not None:
            pages[url] = Page(url, links=[target])
            queue.append(target)
            continue
        pages[url] = page = _visit(driver, url, server)
        for link in page.links:
            target, _ = urldefrag(link)
            if _is_page(target, server) and target not in pages:
                queue.append(target)
    return pages


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []):
            files.append(chapter["file"])
            files.extend(section["file"] for section in chapter.get("sections", []))
    return files


def test_every_chapter_of_the_toc_is_reached(crawl, server):
    reached = {unquote(urlparse(u).path).lstrip("/") for u in crawl}
    missing = [f for f in _toc_files() if f"{f}.html" not in reached]
    assert not missing, f"pages in book/_toc.yml not reached by following links: {missing}"


def test_pages_load_without_console_errors(crawl):
    errors = {u: p.console_errors for u, p in crawl.items() if p.console_errors}
    assert not errors, f"SEVERE console messages: {json.dumps(errors, indent=1)}"


def test_pages_need_nothing_beyond_the_site(crawl):
    outside = {u: p.outside_requests for u, p in crawl.items() if p.outside_requests}
    assert not outside, f"requests that left the site (a CDN?): {json.dumps(outside, indent=1)}"


def test_every_image_loads_and_has_alt_text(crawl):
    broken = {u: p.broken_images for u, p in crawl.items() if p.broken_images}
    assert not broken, f"images with no natural size: {broken}"
    bad = {u: p.bad_alts for u, p in crawl.items() if p.bad_alts}
    assert not bad, f"images without a real alt text: {bad}"


def test_internal_links_and_anchors_resolve(crawl, site, server):
    broken = []
    for url, page in crawl.items():
        for link in page.links:
            target, fragment = urldefrag(link)
            path = site / unquote(urlparse(target).path).lstrip("/")
            if path.is_dir():
                path = path / "index.html"
            if not path.exists():
                broken.append((url, link, "no such file"))
            elif fragment and _is_page(target, server):
                ids = crawl[target].ids if target in crawl else None
                if ids is not None and unquote(fragment) not in ids:
                    broken.append((url, link, "no such anchor"))
    assert not broken, "broken internal links:\n" + "\n".join(map(str, broken))


def test_equations_are_typeset(crawl):
    with_math = {u: p.math for u, p in crawl.items() if p.math.get("elements")}
    assert with_math, "no page has an equation: did the math extension change?"
    bad = {u: m for u, m in with_math.items() if m["typeset"] != m["elements"] or m["errors"] or not m["mathjax"]}
    assert not bad, f"equations MathJax did not typeset (or typeset with errors): {bad}"


def test_widgets_render_from_their_stored_state(crawl):
    with_views = {u: p.widgets for u, p in crawl.items() if p.widgets.get("views")}
    bad = {u: w for u, w in with_views.items() if not w["state"] or w["rendered"] < 1}
    assert not bad, f"widget views not rendered: {bad}"


#: Hosts a page must not link to: launch and repository buttons to a placeholder home are links to nowhere
#: (the book has no public repository yet, and Binder or Colab would have neither vefi nor the data).
_NOWHERE = ("mybinder.org", "colab.research.google.com", "github.com/vefi-book")


def test_chapters_have_a_download_button_and_no_link_to_nowhere(crawl):
    chapters = {u: p for u, p in crawl.items() if "/notebooks/" in u}
    assert chapters, "no chapter page was reached"
    for url, page in chapters.items():
        name = posixpath.basename(urlparse(url).path).removesuffix(".html")
        assert any(link.split("#")[0].endswith(f"_sources/notebooks/{name}.ipynb") for link in page.links), \
            f"{url}: no download button for the notebook"
    nowhere = {u: [h for h in p.external if any(host in h for host in _NOWHERE)] for u, p in crawl.items()}
    nowhere = {u: hs for u, hs in nowhere.items() if hs}
    assert not nowhere, f"links to a placeholder or to a launcher without vefi and its data: {nowhere}"


def test_solutions_start_hidden(crawl):
    dropdowns = {u: p.dropdowns for u, p in crawl.items() if p.dropdowns}
    assert dropdowns, "no page has a dropdown solution (book/teaching.md has one)"
    shown = {u: [d["title"] for d in ds if not d["hidden"]] for u, ds in dropdowns.items()}
    assert not any(shown.values()), f"solutions visible before the reader opens them: {shown}"


_RAW_TABLE = re.compile(r"\|\s*:?-{3,}")     # a Markdown table's separator row: |---|
_RAW_MATH = re.compile(r"\$[^$\s][^$]{0,200}\$")  # $...$ that MathJax never saw
_PROGRESS = re.compile(r"\d+%\||\d+(\.\d+)?\s*it/s")  # tqdm's bar and rate


def test_no_raw_markdown_on_any_page(crawl):
    raw = {u: _RAW_TABLE.findall(p.text) + _RAW_MATH.findall(p.text) for u, p in crawl.items()}
    raw = {u: found for u, found in raw.items() if found}
    assert not raw, f"Markdown shown as text (a table or $math$ not rendered): {raw}"


def test_printed_outputs_fit_the_column(crawl):
    """A printout wider than the column would hide its end (book/_static/outputs.css wraps them)."""
    wide = {u: p.overflowing for u, p in crawl.items() if p.overflowing}
    assert not wide, f"printed outputs wider than the column, their ends hidden: {json.dumps(wide, indent=1)}"


def test_admonition_titles_span_their_box(crawl):
    """An exercise's title bar stopped at two thirds of its box: the prose measure caught it (issue #14)."""
    short = {u: p.short_titles for u, p in crawl.items() if p.short_titles}
    assert not short, f"admonition titles narrower than their box (book/_static/layout.css): {short}"
    assert any("Exercise" in p.text for p in crawl.values()), "no exercise found: are the pages inspected?"


def test_glued_text_reads_as_the_text_around_it(crawl):
    """Computed sentences showed in bold in the middle of paragraphs (issue #14)."""
    bold = {u: p.bold_pasted for u, p in crawl.items() if p.bold_pasted}
    assert not bold, f"glued text in another font weight than its paragraph (book/_static/layout.css): {bold}"


# The book's figures are drawn at matplotlib's 100 dpi with no text under 8 pt (tests/test_figures.py checks
# the sources): shown at a fraction `scale` of its natural width, 8 pt text is 8 * 100 / 72 * scale pixels
# high, 8.3 px at the scale below, the least that reads. The column is about 960 px (book/_static/layout.css).
LEGIBLE_SCALE = 0.75


def test_figures_are_not_shrunk_below_a_legible_scale(crawl):
    """A figure wider than the column is shrunk with its text: 4-5 px labels were seen (issue #14)."""
    small = {u: [f"{f['src']} ({f['alt'][:40]}): {f['natural']} px shown at {f['shown']:.0f} px "
                 f"({f['shown'] / f['natural']:.2f})" for f in p.figures if f["shown"] < LEGIBLE_SCALE * f["natural"]]
             for u, p in crawl.items()}
    small = {u: f for u, f in small.items() if f}
    assert not small, (f"figures shrunk below {LEGIBLE_SCALE} of their natural width, their text under 8 px: "
                       f"draw them at most about {960 / LEGIBLE_SCALE / 100:.0f} inches wide: "
                       f"{json.dumps(small, indent=1)}")
    assert any(p.figures for p in crawl.values()), "no figure found in any notebook output: is the page inspected?"


def test_no_progress_bar_on_any_page(crawl):
    bars = {u: [t[:200] for t in p.stderr if _PROGRESS.search(t)] for u, p in crawl.items()}
    bars = {u: b for u, b in bars.items() if b}
    assert not bars, f"progress bars on pages (the book builds with VEFI_PROGRESS=off): {bars}"


def _claims_of_executed_notebook(site: Path, name: str) -> tuple[int, int]:
    """The rows of the claims table the executed notebook displayed (Markdown), and the count it printed.

    The execution is the one the book shows: the build's jupyter-cache, next to the HTML, matched to the
    notebook file."""
    cache_dir, path = site.parent / ".jupyter_cache", ROOT / "notebooks" / f"{name}.ipynb"
    assert cache_dir.is_dir(), f"no execution cache {cache_dir} next to the HTML"
    cache = get_cache(str(cache_dir))
    try:
        executed = cache.get_cache_bundle(cache.match_cache_notebook(nbformat.read(path, as_version=4)).pk).nb
    except KeyError:
        pytest.fail(f"{path} has no execution in {cache_dir}: was it edited after the book was built?")
    outputs = [o for cell in executed.cells for o in cell.get("outputs", [])]
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    tables = [t for t in tables if _RAW_TABLE.search(t) and "| claim |" in t.splitlines()[0]]
    assert len(tables) == 1, f"{path}: expected one Markdown table of claims among the outputs, found {len(tables)}"
    lines = [line for line in tables[0].splitlines() if line.strip().startswith("|")]
    printed = [re.search(r"^(\d+) rows$", o.get("text", ""), re.M) for o in outputs]
    printed = [int(m.group(1)) for m in printed if m]
    assert printed, f"{path}: no 'N rows' line among the outputs"
    return len(lines) - 2, printed[0]  # minus the header and the separator


def test_claims_table_has_one_row_per_claim(crawl, site):
    name = "10_reproduction_summary"
    pages = [p for u, p in crawl.items() if urlparse(u).path.endswith(f"/notebooks/{name}.html")]
    assert pages, f"chapter {name} was not reached"
    rows, printed = _claims_of_executed_notebook(site, name)
    assert rows == printed > 0, f"{name}: the Markdown table has {rows} rows, the notebook counted {printed} claims"
    tables = [t for t in pages[0].tables if "claim" in t["header"]]
    assert len(tables) == 1, f"{name}: expected one HTML table with a 'claim' column, found {pages[0].tables}"
    assert tables[0]["rows"] == rows, f"{name}: the HTML table has {tables[0]['rows']} rows for {rows} claims"


# Changes one control of every offline explorer (vefi.plotting.offline_explorer) of the page: the next option
# of a drop-down list, the next position of a slider, as a reader's click would, with the events it fires.
_CHANGE_CONTROLS = """
const changed = [];
for (const root of document.querySelectorAll('.vefi-offline-explorer')) {
  const img = root.querySelector('img');
  const before = img.src;
  for (const control of root.querySelectorAll('select, input[type=range]')) {
    const last = control.tagName === 'SELECT' ? control.options.length - 1 : Number(control.max);
    const now = control.tagName === 'SELECT' ? control.selectedIndex : Number(control.value);
    const next = now < last ? now + 1 : now - 1;
    if (control.tagName === 'SELECT') { control.selectedIndex = next; } else { control.value = next; }
    control.dispatchEvent(new Event(control.tagName === 'SELECT' ? 'change' : 'input', {bubbles: true}));
    const after = img.src;
    await new Promise((r) => { if (img.complete) { r(); } else { img.onload = img.onerror = r; } });
    changed.push({root: root.id, control: control.id, changed: after !== before, data: after.startsWith('data:image/png'),
                  width: img.naturalWidth, alt: img.alt});
    break;
  }
}
return changed;
"""


@pytest.mark.parametrize("chapter", ["04_backprojection", "05_explaining_a_prediction", "11_tour_of_methods"])
def test_offline_explorer_changes_the_image_without_a_kernel(driver, server, chapter):
    """The chapter's explorer of precomputed states: changing a control shows another state's image."""
    driver.get(urljoin(server, f"notebooks/{chapter}.html"))
    settled = driver.execute_async_script(_SETTLE)
    assert settled is True, f"{chapter}: the page did not settle: {settled}"
    script = "const done = arguments[arguments.length - 1]; (async () => {" + _CHANGE_CONTROLS + \
        "})().then(done, (e) => done(String(e)));"
    changed = driver.execute_async_script(script)
    assert isinstance(changed, list) and changed, f"{chapter}: no offline explorer on the page ({changed})"
    bad = [c for c in changed if not (c["changed"] and c["data"] and c["width"] > 0 and c["alt"])]
    assert not bad, f"{chapter}: changing a control did not show another precomputed image: {bad}"
    # the explorers' own ids are unique on the page (sphinx-exercise repeats some of its own: not checked here)
    ids = driver.execute_script("return Array.from(document.querySelectorAll('[id]')).map((e) => e.id);")
    ours = [i for i in ids if i.startswith("vefi-explorer-")]
    assert ours and len(ours) == len(set(ours)), f"{chapter}: explorer ids repeat: {sorted(ours)}"
