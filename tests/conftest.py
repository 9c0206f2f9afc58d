"""Shared test set-up: peer libraries that are skipped on a laptop but never vanish in CI.

The peer libraries the tests compare against (captum, zennit, spgl1, spams, ...) are declared test
dependencies: pyproject.toml's ``[project.optional-dependencies] test`` list (and environment.yml).

* Import a peer inside the test that uses it, through the ``peer`` fixture, never at module level::

      def test_matches_captum(peer):
          captum_attr = peer("captum.attr")
          ...

  so that a missing peer removes only the tests that need it, not the peer-free checks of the same file.
* ``peer(name)`` returns the imported module. When the import fails it skips the test, with the import error
  as reason; when the environment variable ``CI`` is ``true`` it FAILS the test instead, naming the declared
  dependency and the import error: in CI every declared dependency is installed, so an import failure is a
  broken install, not a reason to test less.
* Under ``CI=true`` the session also starts by importing every declared test dependency (names read from
  pyproject.toml, distribution names mapped to import names, e.g. ``spams-bin`` -> ``spams``) and stops with
  the list of failures before running any test.

``peer`` refuses a module whose distribution pyproject.toml does not declare: a peer the tests need must be
installed by ``pip install -e .[test]`` on every machine.
"""

import importlib
import os
import re
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# distribution name -> import name, where the two differ (the rest: "-" becomes "_")
IMPORT_NAMES = {
    "spams-bin": "spams",
    "pyyaml": "yaml",
    "scikit-learn": "sklearn",
    "pillow": "PIL",
    "jupyter-book": "jupyter_book",
    "sphinx-exercise": "sphinx_exercise",
}


def in_ci():
    """Whether the tests run in CI (``CI=true``), where a declared dependency that does not import is an error."""
    return os.environ.get("CI", "").strip().lower() == "true"


def declared_dependencies(extra="test"):
    """Map the import name of every distribution in pyproject.toml's ``extra`` list to its requirement string.

    ``extra=None`` reads the runtime ``[project] dependencies`` instead.
    """
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    declared = {}
    for requirement in requirements:
        distribution = distribution_name(requirement)
        declared[IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))] = requirement
    return declared


def distribution_name(requirement):
    """The normalised distribution name of a requirement string: ``"Spams_Bin>=2.6"`` -> ``"spams-bin"``."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def import_peer(name):
    """Import module ``name`` of a declared dependency; skip the calling test if it fails, or fail under CI=true.

    Any exception of the import counts (a compiled peer built against another numpy raises more than
    ImportError), and its message is the reason given.
    """
    declared = {**declared_dependencies(None), **declared_dependencies("test")}
    top = name.split(".")[0]
    if top not in declared:
        pytest.fail(f"peer({name!r}): {top!r} is not a declared dependency in {PYPROJECT.name}; add its "
                    "distribution to [project.optional-dependencies] test (and environment.yml), or to "
                    "IMPORT_NAMES in tests/conftest.py if its import name differs", pytrace=False)
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - reported, never swallowed: a skip or, in CI, a failure
        reason = f"{name} does not import ({type(error).__name__}: {error})"
    # outside the except block, so that the report is the reason alone, not a chained traceback
    if in_ci():
        pytest.fail(f"CI=true: declared test dependency {declared[top]!r} is broken: {reason}; "
                    "reinstall with pip install -e '.[test]'", pytrace=False)
    pytest.skip(f"{reason}; install the declared test dependency {declared[top]!r}")


@pytest.fixture
def peer():
    """The importer of peer libraries: ``peer("captum.attr")`` returns the module or skips (fails in CI)."""
    return import_peer


def broken_test_dependencies():
    """Every declared test dependency that does not import, as ``requirement: error`` lines."""
    broken = []
    for module, requirement in declared_dependencies("test").items():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - collected and reported below
            broken.append(f"{requirement} (import {module}): {type(error).__name__}: {error}")
    return broken


def pytest_sessionstart(session):
    """Under CI=true, stop before any test when a declared test dependency does not import."""
    if not in_ci():
        return
    broken = broken_test_dependencies()
    if broken:
        pytest.exit("CI=true but declared test dependencies of pyproject.toml do not import (a broken install; "
                    "run pip install -e '.[test]'):\n  " + "\n  ".join(broken), returncode=pytest.ExitCode.USAGE_ERROR)
