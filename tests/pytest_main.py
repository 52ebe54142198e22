"""The `main` of every Bazel py_test in BUILD: runs pytest on the test files it is given.

    python tests/pytest_main.py tests/test_atomic.py [pytest options]

A test file has no `__main__` of its own; without this, `bazel test` would run
the file as a script, define the tests, call none of them and pass.
"""

import sys

import pytest


def main(argv):
    """Runs pytest on `argv` (test files, then options); returns its exit status."""
    if not argv:
        print("usage: pytest_main.py TEST_FILE [pytest options]", file=sys.stderr)
        return 2
    # Bazel's runfiles are read-only: no .pytest_cache there.
    return int(pytest.main(["-q", "-p", "no:cacheprovider", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
