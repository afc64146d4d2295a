"""The SentencePiece text tokenizer and the tiny demo model (CPU, no network)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from personaplex.config import TEXT_BOS, TEXT_EOS, TEXT_EPAD, TEXT_PAD
from personaplex.errors import PersonaplexError
from personaplex.text import TextTokenizer, train_demo_tokenizer, wrap_system_prompt


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return TextTokenizer(train_demo_tokenizer(tmp_path_factory.mktemp("spm") / "demo.model"))


def test_demo_tokenizer_is_fast_and_deterministic(tmp_path: Path) -> None:
    start = time.monotonic()
    first = train_demo_tokenizer(tmp_path / "a.model", vocab_size=512)
    assert time.monotonic() - start < 5
    second = train_demo_tokenizer(tmp_path / "b" / "b.model", vocab_size=512)
    assert first.read_bytes() == second.read_bytes()


def test_special_ids_match_the_released_layout(tokenizer: TextTokenizer) -> None:
    sp = tokenizer._sp
    assert [sp.IdToPiece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (TEXT_EPAD, TEXT_BOS, TEXT_EOS, TEXT_PAD)
    assert 256 < tokenizer.vocab_size <= 512


@pytest.mark.parametrize(
    "text",
    ["Hello, how are you today?", "You are a wise and friendly teacher.", "Café au lait, s'il vous plaît, 3€ 😀"],
)
def test_encode_decode_round_trip(tokenizer: TextTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert TEXT_EPAD not in ids  # byte fallback: nothing becomes <unk>, which would read as EPAD
    assert TEXT_BOS not in ids and TEXT_EOS not in ids
    assert tokenizer.decode(ids) == text
    # Special and out-of-vocabulary ids are ignored.
    assert tokenizer.decode([TEXT_PAD, TEXT_BOS, *ids, TEXT_EPAD, TEXT_EOS, tokenizer.vocab_size + 5]) == text


def test_piece_mapping(tokenizer: TextTokenizer) -> None:
    assert tokenizer.piece(TEXT_EPAD) == "EPAD" and tokenizer.piece(TEXT_PAD) == "PAD"
    assert tokenizer.piece(TEXT_BOS) == "" and tokenizer.piece(TEXT_EOS) == ""
    assert tokenizer.piece(tokenizer.vocab_size) == "" and tokenizer.piece(31_999) == "" and tokenizer.piece(-1) == ""
    ids = tokenizer.encode("Hello there")
    pieces = [tokenizer.piece(i) for i in ids]
    assert "".join(pieces) == " Hello there"  # '▁' becomes a space
    assert all("\u2581" not in p for p in pieces)


def test_system_prompt_wrapping(tokenizer: TextTokenizer) -> None:
    prompt = "You enjoy having a good conversation."
    wrapped = "<system> You enjoy having a good conversation. <system>"
    assert wrap_system_prompt(prompt) == wrapped
    assert wrap_system_prompt(f"  {prompt}\n") == wrapped
    assert tokenizer.system_prompt_ids(prompt) == tokenizer.encode(wrapped)
    # Already wrapped: kept as is (after stripping), not wrapped twice.
    assert wrap_system_prompt(f"  {wrapped} ") == wrapped
    assert tokenizer.system_prompt_ids(wrapped) == tokenizer.encode(wrapped)
    assert tokenizer.system_prompt_ids("<system>Be brief.<system>") == tokenizer.encode("<system>Be brief.<system>")
    # Tags are plain text, no special ids.
    assert not set(tokenizer.system_prompt_ids(prompt)) & {TEXT_EPAD, TEXT_BOS, TEXT_EOS, TEXT_PAD}
    assert tokenizer.decode(tokenizer.system_prompt_ids(prompt)) == wrapped
    assert tokenizer.system_prompt_ids("") == [] and tokenizer.system_prompt_ids("  \n\t") == []


def test_missing_or_unreadable_model(tmp_path: Path) -> None:
    with pytest.raises(PersonaplexError, match="text tokenizer .*missing.model not found"):
        TextTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(PersonaplexError) as error:
        TextTokenizer(bad)
    assert "bad.model" in str(error.value) and "\n" not in str(error.value)


def test_byte_fallback_pieces(tokenizer: TextTokenizer) -> None:
    """Byte pieces show as their character when printable ASCII, never as `<0x..>`."""
    sp = tokenizer._sp
    byte_ids = {str(sp.IdToPiece(i)): i for i in range(tokenizer.vocab_size) if sp.IsByte(i)}
    assert tokenizer.piece(byte_ids["<0x41>"]) == "A"
    assert tokenizer.piece(byte_ids["<0xC3>"]) == ""  # half of a two-byte character
    assert tokenizer.piece(byte_ids["<0x0A>"]) == ""  # control character
