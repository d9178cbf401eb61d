"""The suite's own safeguards (tests/support/strict_skips.py, suite_guard.py, setup.cfg's timeout), run on a small
suite of their own in a copy of the repository's skeleton: a real pytest in a real process each time."""
import shutil
import subprocess
import sys
import textwrap

import pytest
from support import REPO

CONFTEST = """\
from support.strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401
from support.suite_guard import pytest_runtest_teardown, pytest_terminal_summary  # noqa: F401
"""


@pytest.fixture
def suite(tmp_path):
    """A folder laid out like the repository: setup.cfg, hvd_llama/, tests/ with conftest.py and support/."""
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    (tmp_path / "hvd_llama").mkdir()
    (tmp_path / "hvd_llama" / "__init__.py").write_text("")
    (tmp_path / "tests" / "support").mkdir(parents=True)
    for name in ("__init__.py", "strict_skips.py", "suite_guard.py"):
        shutil.copy(REPO / "tests" / "support" / name, tmp_path / "tests" / "support" / name)
    (tmp_path / "tests" / "conftest.py").write_text(CONFTEST)
    return tmp_path


def run_suite(root, tests: str, **env) -> subprocess.CompletedProcess:
    (root / "tests" / "test_example.py").write_text(textwrap.dedent(tests))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"], cwd=root, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", **env})


def test_a_test_that_removes_the_checkout_stops_the_suite_at_once_naming_it(suite):
    result = run_suite(suite, """
        import time
        from pathlib import Path

        def test_passes():
            pass

        def test_deletes_the_package():
            (Path(__file__).parents[1] / "hvd_llama" / "__init__.py").unlink()

        def test_would_wait_out_its_timeout():
            time.sleep(60)
    """)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "stopping the suite: " in result.stdout and "hvd_llama/__init__.py vanished by the end of " \
        "tests/test_example.py::test_deletes_the_package" in result.stdout
    assert "test_would_wait_out_its_timeout" not in result.stdout and "2 passed" in result.stdout
    assert "GiB free on" in result.stdout and " processes" in result.stdout


def test_a_failure_ends_with_the_machines_state_and_a_pass_does_not(suite):
    failed = run_suite(suite, "def test_fails():\n    assert 1 == 2\n")
    assert failed.returncode == 1
    assert "the machine at the end of the suite: " in failed.stdout and "GiB of memory available" in failed.stdout
    passed = run_suite(suite, "def test_passes():\n    pass\n")
    assert passed.returncode == 0 and "the machine at the end" not in passed.stdout


def test_every_test_has_a_timeout_and_ci_turns_skips_into_failures(suite):
    tests = "import pytest\n\ndef test_skipped():\n    pytest.skip('no corpus here')\n"
    locally = run_suite(suite, tests)
    assert locally.returncode == 0 and "1 skipped" in locally.stdout
    assert "timeout: 600.0s" in locally.stdout  # pytest-timeout read setup.cfg
    on_ci = run_suite(suite, tests, HVD_LLAMA_STRICT_SKIPS="1")
    assert on_ci.returncode == 1
    assert "HVD_LLAMA_STRICT_SKIPS=1 turns into a failure: Skipped: no corpus here" in on_ci.stdout
