"""The API reference page lists every public name of every module, and every module is on it."""

import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("api_reference", ROOT / "scripts" / "api_reference.py")
api_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api_reference)


def test_every_module_is_on_the_page():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "vefi").rglob("*.py")
               if not p.name.startswith("_")}
    listed = set(api_reference.GENERAL) | set(api_reference.BOOK)
    assert modules - listed == set(), "modules missing from scripts/api_reference.py's lists"
    assert listed - modules - {"vefi"} == set(), "modules listed that do not exist"


def test_every_public_name_is_on_the_page():
    page = api_reference.render()
    for name in api_reference.GENERAL + api_reference.BOOK:
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        for public in module.__all__:
            assert f"`{public}" in page, f"{name}.{public} is not on the API page"
            assert hasattr(module, public), f"{name}.__all__ names {public}, which does not exist"
    assert ":func:" not in page and "(no docstring)" not in page
    # a docstring's Sphinx math is typeset on the page, not shown as a role (grad_cam_parts showed it raw)
    assert not re.search(r":[a-z]+:`", page), re.search(r".{60}:[a-z]+:`.{60}", page)
    assert "$\\mathrm{ReLU}(\\sum_k \\alpha_k A_k)$" in page
