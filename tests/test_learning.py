"""The tiny preset learns real text: validation loss falls well below the unigram entropy in minutes."""
import numpy as np
import pytest
from support.trainrun import metrics, train_job

from hvd_llama.training.data import TokenWindows

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def unigram_entropy(data_dir) -> float:
    """Entropy (nats) of the train split's token frequencies: the loss of the best context-free model."""
    train = TokenWindows(data_dir, "train", seq_len=1)
    counts = np.bincount(train.tokens(0, train.n_tokens)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_preset_learns_real_text(corpus_path, tmp_path):
    from hvd_llama.prepare import main as prepare_main
    data_dir = tmp_path / "prepared"
    prepare_main(["--input", str(corpus_path), "--out", str(data_dir), "--vocab-size", "1024"])
    run_dir = tmp_path / "run"
    job = train_job(run_dir, ["--config", "configs/tiny.yaml", "--set", f"data.dir={data_dir}",
                              "--set", "model.vocab_size=1024", "--set", "train.max_steps=150",
                              "--set", "train.eval_every=150",
                              "--set", "train.eval_windows=0", "--set", "checkpoint.every=0"], timeout=400)
    assert job.returncode == 0, job.output[-3000:]
    val_loss = metrics(run_dir)[-1]["val_loss"]
    entropy = unigram_entropy(data_dir)
    print(f"val loss {val_loss:.3f} vs unigram entropy {entropy:.3f}")
    assert val_loss < entropy - 1.0, (val_loss, entropy)
