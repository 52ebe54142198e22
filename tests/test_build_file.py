"""BUILD names every module and test file, so the Bazel targets cannot rot."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quoted(build_text):
    return set(re.findall(r'"([^"]+)"', build_text))


def test_build_names_every_module_and_test():
    build = (ROOT / "BUILD").read_text()
    named = _quoted(build)
    modules = {f"tf_psp/{p.name}" for p in (ROOT / "tf_psp").glob("*.py")}
    tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")}
    missing = sorted((modules | tests) - named)
    assert not missing, f"BUILD does not name: {missing}"
    stale = sorted(n for n in named if n.endswith(".py") and not (ROOT / n).exists())
    assert not stale, f"BUILD names files that do not exist: {stale}"


def test_every_test_file_has_a_py_test_target():
    build = (ROOT / "BUILD").read_text()
    for path in (ROOT / "tests").glob("test_*.py"):
        assert re.search(rf'py_test\(\s*name = "{path.stem}"', build), path.name
