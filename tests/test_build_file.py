"""BUILD names every module and test file, and every py_test runs pytest on its own file.

BUILD is Starlark, a Python subset: it is read with `ast`. A test file has no
`__main__`, so a target whose `main` is the test file itself would run nothing
and pass; every target must run tests/pytest_main.py with its file as argument.
"""

import ast
import pathlib

import pytest

import pytest_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAIN = "tests/pytest_main.py"


def _targets(build_text, rule):
    """The keyword arguments of every `rule(...)` call in BUILD text, as Python values."""
    targets = []
    for statement in ast.parse(build_text).body:
        call = getattr(statement, "value", None)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == rule:
            targets.append({k.arg: ast.literal_eval(k.value) for k in call.keywords})
    return targets


def build_problems(build_text, test_files):
    """What is wrong with the py_test targets of `build_text` for these `tests/test_*.py` paths.

    Returns:
        One sentence per problem; empty when every test file has exactly one
        target, named after it, that runs pytest on that file and no other.
    """
    problems = []
    targets = _targets(build_text, "py_test")
    by_name = {}
    for target in targets:
        by_name.setdefault(target.get("name"), []).append(target)
    for path in sorted(test_files):
        name = pathlib.PurePosixPath(path).stem
        found = by_name.get(name, [])
        if len(found) != 1:
            problems.append(f"{path}: {len(found)} py_test targets named {name!r}, expected 1")
            continue
        target = found[0]
        if target.get("main") != MAIN:
            problems.append(f"{name}: main is {target.get('main')!r}, expected {MAIN!r} "
                            "(a test file has no __main__: it would run no test and pass)")
        if target.get("args") != [f"$(rootpath {path})"]:
            problems.append(f"{name}: args are {target.get('args')!r}, expected "
                            f"['$(rootpath {path})'] (pytest on its own file)")
        if set(target.get("srcs", [])) != {path, MAIN}:
            problems.append(f"{name}: srcs are {target.get('srcs')!r}, expected {path} and {MAIN}")
    stray = sorted(set(by_name) - {pathlib.PurePosixPath(p).stem for p in test_files})
    problems += [f"py_test {name!r} has no tests/{name}.py" for name in stray]
    return problems


def _test_files():
    return [f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")]


def test_build_names_every_module_and_test():
    build = (ROOT / "BUILD").read_text()
    named = {value for target in _targets(build, "py_library") + _targets(build, "py_test")
             for key in ("srcs", "data") for value in target.get(key, [])}
    modules = {f"tf_psp/{p.name}" for p in (ROOT / "tf_psp").glob("*.py")}
    tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")}
    missing = sorted((modules | tests | {"pytest.ini"}) - named)
    assert not missing, f"BUILD does not name: {missing}"
    stale = sorted(n for n in named if not (ROOT / n).exists())
    assert not stale, f"BUILD names files that do not exist: {stale}"


def test_every_test_file_has_a_target_that_runs_pytest_on_it():
    assert build_problems((ROOT / "BUILD").read_text(), _test_files()) == []


_GOOD = '''
py_test(
    name = "test_a",
    srcs = ["tests/test_a.py", "tests/pytest_main.py"],
    main = "tests/pytest_main.py",
    args = ["$(rootpath tests/test_a.py)"],
)
'''


@pytest.mark.parametrize("broken, complaint", [
    (_GOOD.replace('main = "tests/pytest_main.py"', 'main = "tests/test_a.py"'),
     "test_a: main is 'tests/test_a.py'"),
    (_GOOD.replace("$(rootpath tests/test_a.py)", "$(rootpath tests/test_b.py)"),
     "test_a: args are"),
    (_GOOD.replace('    args = ["$(rootpath tests/test_a.py)"],\n', ""), "test_a: args are None"),
    (_GOOD.replace('name = "test_a"', 'name = "test_b"'), "tests/test_a.py: 0 py_test targets"),
    (_GOOD + _GOOD, "tests/test_a.py: 2 py_test targets"),
    (_GOOD.replace('"tests/test_a.py", ', ""), "test_a: srcs are"),
])
def test_a_broken_build_is_reported(broken, complaint):
    assert build_problems(_GOOD, ["tests/test_a.py"]) == []
    problems = build_problems(broken, ["tests/test_a.py"])
    assert any(p.startswith(complaint) for p in problems), problems


def test_pytest_main_runs_the_file_and_fails_when_it_fails(tmp_path, capsys):
    (tmp_path / "test_passes.py").write_text("def test_ok():\n    assert True\n")
    (tmp_path / "test_fails.py").write_text("def test_broken():\n    assert False\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's settings
    options = ["--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini")]
    assert pytest_main.main([str(tmp_path / "test_passes.py"), *options]) == 0
    assert pytest_main.main([str(tmp_path / "test_fails.py"), *options]) == 1
    assert "1 failed" in capsys.readouterr().out
    assert pytest_main.main([]) == 2
