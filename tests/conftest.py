import signal

import pytest
from support import netns
from support.data import CORPUS_CHARS, stdlib_text
from support.strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks)
from support.suite_guard import pytest_runtest_teardown, pytest_terminal_summary  # noqa: F401 (hooks)
from support.trainrun import micro_overrides, train_single

from hvd_llama.prepare import main as prepare_main

# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would every job
# it starts (a shell cannot trap a signal ignored when it started): the stop tests need the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["horovodrun", "mpirun"])
def launcher(request):
    """Run a distributed test under both launchers users have."""
    return request.param


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory):
    """The tests' corpus: stdlib_text(CORPUS_CHARS) in one file, so one document, which prepare splits by
    characters (the last tenth is validation)."""
    path = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    path.write_text(stdlib_text(CORPUS_CHARS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir(corpus_path, tmp_path_factory):
    """The tests' corpus prepared (vocabulary 512), shared by the training tests."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_main(["--input", str(corpus_path), "--out", str(out), "--vocab-size", "512"])
    return out


@pytest.fixture(scope="session")
def small_data(data_dir, corpus_path, tmp_path_factory):
    """The first 40,000 characters of the tests' corpus encoded with data_dir's tokenizer (no tokenizer training:
    fast), with a validation split of about 2,000 tokens."""
    root = tmp_path_factory.mktemp("small")
    source = root / "small.txt"
    source.write_text(corpus_path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    out = root / "prepared"
    prepare_main(["--input", str(source), "--out", str(out), "--tokenizer", str(data_dir / "tokenizer.model"),
                  "--workers", "1"])
    return out


@pytest.fixture(scope="session")
def micro_run(small_data, tmp_path_factory):
    """Run dir of a micro model (context 64, vocab 512) trained 3 steps on small_data."""
    run_dir = tmp_path_factory.mktemp("micro") / "run"
    result = train_single(run_dir, micro_overrides(small_data, **{"train.max_steps": 3}))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def hosts(tmp_path):
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.TwoHosts(tmp_path / "hosts") as cluster:
        yield cluster
