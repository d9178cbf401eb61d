"""SentencePiece training settings: lossless round trips, special ids, and clear errors."""
import hashlib

import pytest

from hvd_llama.cli import UserError
from hvd_llama.prep.text import Cleaner, sentence_chunks
from hvd_llama.tokenizer import Tokenizer, train_tokenizer

CODE = '''class Stack:
    """A tiny stack."""

    def __init__(self):
        self.items = []

    def push(self, item):
\tself.items.append(item)   # tab-indented, two spaces before the comment
        return len(self.items)


def main():
    s = Stack()
    for i in range(10):
        s.push(i * 31415)
'''
PROSE = ("The quick brown fox jumps over the lazy dog. Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve "
         "fa\u00e7ade. \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002 \u00bfQu\u00e9 tal? "
         "Numbers: 2024, 3.14159, 1e-9.\n")


def corpus_sentences():
    return [s for _ in range(30) for text in (CODE, PROSE) for s in sentence_chunks(text, 200)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tokenizer(corpus_sentences(), tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer(model_path)


def test_special_ids(tok, model_path):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == 400
    assert tok.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()


@pytest.mark.parametrize("text", [
    CODE,
    PROSE,
    Cleaner()(CODE + "\n\n" + PROSE),
    "  leading spaces, trailing spaces  \n\n\n\t\ttabs\n",
    "emoji \U0001f600\U0001f3fd, new scripts: \u0928\u092e\u0938\u094d\u0924\u0947 \u05e9\u05dc\u05d5\u05dd",
    "\u00a0non-breaking and \u3000 ideographic spaces",
])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # byte fallback spells out anything unseen
    assert tok.decode(ids) == text


def test_bos_eos_and_digit_splitting(tok):
    ids = tok.encode("31415", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert [tok.decode([i]) for i in ids[1:-1]] == list("31415")


def test_code_whitespace_is_learned(tok):
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert "\u2581\u2581\u2581\u2581" in pieces  # four spaces of indentation as one piece
    assert any("\n" in p for p in pieces)  # newlines can be part of pieces


def test_training_is_deterministic(tmp_path, model_path):
    again = train_tokenizer(corpus_sentences(), tmp_path / "again.model", vocab_size=400)
    assert again.read_bytes() == model_path.read_bytes()


def test_vocabulary_too_large_for_corpus(tmp_path):
    with pytest.raises(UserError, match=r"--vocab-size 50000 is larger than this corpus supports.*use --vocab-size"):
        train_tokenizer(corpus_sentences(), tmp_path / "t.model", vocab_size=50000)
    assert not (tmp_path / "t.model").exists()


def test_vocabulary_too_small(tmp_path):
    with pytest.raises(UserError, match=r"--vocab-size 100 is too small: this corpus needs at least \d+ pieces"):
        train_tokenizer(corpus_sentences(), tmp_path / "t.model", vocab_size=100)


@pytest.mark.parametrize("content", [b"", b"just some text, not a model\n", bytes(range(256)) * 4])
def test_not_a_sentencepiece_model(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not a SentencePiece model"):
        Tokenizer(path)


def test_missing_model(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
