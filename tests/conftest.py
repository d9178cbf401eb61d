import signal
from pathlib import Path

import pytest
from strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks)
from trainrun import train_single

from hvd_llama.prep.sources import stdlib_files
from hvd_llama.prepare import main as prepare_main

# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would every job
# it starts (a shell cannot trap a signal ignored when it started): the stop tests need the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tiny Shakespeare's size: text enough for a 512-piece tokenizer and a 110,000-character validation split, prepared
# in about 2 s.
CORPUS_CHARS = 1_100_000


@pytest.fixture(params=["horovodrun", "mpirun"])
def launcher(request):
    """Run a distributed test under both launchers users have."""
    return request.param


def stdlib_text(chars: int) -> str:
    """The first `chars` characters of the running Python's standard-library sources, concatenated in the order
    `prepare --input stdlib` reads them: text every machine with Python has, the same on every run."""
    parts, total = [], 0
    for path in stdlib_files():
        if total >= chars:
            break
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
    return "".join(parts)[:chars]


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


def micro_overrides(data_dir: Path, **extra) -> list:
    """--set values for a model small enough that a 2-rank step takes milliseconds."""
    values = {"data.dir": str(data_dir), "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4,
              "model.n_kv_heads": 2, "model.vocab_size": 512, "model.max_seq_len": 64, "train.seq_len": 32,
              "train.batch_size": 4, "train.max_steps": 5, "train.eval_every": 0, "optim.warmup_steps": 2,
              "optim.lr": 3e-3, "optim.min_lr": 3e-4, "checkpoint.every": 0, "log.peak_flops": 1e11}
    values.update(extra)
    return [item for key, value in values.items() for item in ("--set", f"{key}={value}")]


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
