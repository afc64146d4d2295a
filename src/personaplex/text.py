"""The text tokenizer: SentencePiece ids for the text stream, and the pieces the transcripts write.

The released vocabulary (`tokenizer_spm_32k_3.model`, 32000 pieces) keeps ids 0-3 special; in the text stream
0 is EPAD (the frame before a word starts), 1/2 BOS/EOS (never used in the stream) and 3 PAD.
`train_demo_tokenizer` builds a tiny model with the same special layout for the `--demo` checkpoint and tests.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Iterable

from personaplex.config import TEXT_BOS, TEXT_EOS, TEXT_EPAD, TEXT_PAD
from personaplex.errors import CheckpointError

SPECIAL_IDS = frozenset({TEXT_EPAD, TEXT_BOS, TEXT_EOS, TEXT_PAD})
SYSTEM_TAG = "<system>"
_WORD_BOUNDARY = "\u2581"  # '▁', SentencePiece's marker for a preceding space


class TextTokenizer:
    """A SentencePiece model loaded from a `.model` file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import sentencepiece

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"text tokenizer {self.path} not found: pass a checkpoint that holds tokenizer_spm_32k_3.model"
            )
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise CheckpointError(
                f"cannot read text tokenizer {self.path} (not a SentencePiece model?): re-download the checkpoint"
            ) from error

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of `text`, without BOS/EOS."""
        return [int(i) for i in self._sp.EncodeAsIds(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping the special ids (EPAD, BOS, EOS, PAD) and ids outside the vocabulary."""
        size = self.vocab_size
        kept = [i for i in map(int, ids) if i not in SPECIAL_IDS and 0 <= i < size]
        return str(self._sp.DecodeIds(kept))

    def piece(self, token_id: int) -> str:
        """What the released offline transcript (JSON list) writes for one text-stream token.

        The piece with '▁' turned into a space, "EPAD" for 0 and "PAD" for 3. BOS/EOS and ids outside the
        vocabulary (a model's text_card may exceed it) give "". A byte-fallback piece (`<0x41>`) gives its
        character when it is printable ASCII, else "" (a lone byte of a multi-byte character).
        """
        token_id = int(token_id)
        if token_id == TEXT_EPAD:
            return "EPAD"
        if token_id == TEXT_PAD:
            return "PAD"
        if token_id in (TEXT_BOS, TEXT_EOS) or not 0 <= token_id < self.vocab_size:
            return ""
        if self._sp.IsByte(token_id):
            value = int(str(self._sp.IdToPiece(token_id))[3:-1], 16)
            return chr(value) if 0x20 <= value < 0x7F else ""
        return str(self._sp.IdToPiece(token_id)).replace(_WORD_BOUNDARY, " ")

    def system_prompt_ids(self, prompt: str) -> list[int]:
        """Ids of the text prompt as the model was trained on it: `<system> {prompt} <system>`.

        A prompt already wrapped in `<system>` tags is kept as is; an empty or blank prompt gives []. The tags
        are plain text, not special tokens.
        """
        return self.encode(wrap_system_prompt(prompt)) if prompt.strip() else []


def wrap_system_prompt(prompt: str) -> str:
    """`<system> {prompt} <system>` of the stripped prompt, unless it is already wrapped that way."""
    cleaned = prompt.strip()
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


# -- the demo tokenizer ------------------------------------------------------------------------------------------
_PERSONAS = (
    "a wise and friendly teacher",
    "a helpful customer service agent for an airline",
    "a patient technical support assistant",
    "a cheerful barista at a small coffee shop",
    "a calm and caring nurse",
    "a knowledgeable travel agent",
    "a polite hotel receptionist",
    "a curious science journalist",
    "an enthusiastic fitness coach",
    "a friendly bank advisor",
)
_TASKS = (
    "Answer questions or provide advice in a clear and engaging way.",
    "Help the customer change their booking.",
    "Explain the problem step by step and check that the user understands.",
    "Take the order and suggest something sweet to go with it.",
    "Ask how the patient is feeling today.",
    "Recommend a destination for a short holiday.",
    "Check the guest in and explain where breakfast is served.",
    "Have a deep conversation about technology.",
    "Encourage the user to keep going.",
    "Help the client open a new savings account.",
)
_NAMES = ("Jane", "Alex", "Sam", "Maria", "Omar", "Priya", "Tom", "Lena", "Kenji", "Rosa")
_GREETINGS = (
    "Hello, how are you today?",
    "Hi there! What can I do for you?",
    "Good morning, thanks for calling.",
    "Good evening and welcome back.",
    "Hey, nice to hear from you again.",
    "Thanks for waiting, I am here now.",
)
_SERVICE = (
    "Could you give me your booking reference, please?",
    "I am sorry about the delay, let me check that for you.",
    "Your order number is {n}, and it should arrive on {day}.",
    "I can move your flight to {day} at {n} o'clock.",
    "Is there anything else I can help you with?",
    "Let me put you on hold for a moment.",
    "The total comes to {n} dollars and fifty cents.",
    "Please restart the router and wait about {n} seconds.",
    "I have sent a confirmation email to your address.",
    "Would you like a receipt with that?",
)
_CHAT = (
    "Yeah, I see what you mean.",
    "Mm-hmm, right, okay.",
    "That sounds great, let's do it.",
    "Oh really? Tell me more about it.",
    "I'm not sure, what do you think?",
    "Sure, no problem at all.",
    "Well, it depends on the weather, I guess.",
    "Wow, that's amazing!",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def demo_corpus() -> list[str]:
    """A few hundred varied English lines (personas, greetings, customer service, chat); deterministic."""
    lines: list[str] = []
    for i, (persona, task) in enumerate(itertools.product(_PERSONAS, _TASKS)):
        name = _NAMES[i % len(_NAMES)]
        prompt = f"You are {persona}. {task} Your name is {name}."
        lines.append(prompt)
        if i % 3 == 0:
            lines.append(wrap_system_prompt(prompt))
    for i, template in enumerate(_SERVICE * 4):
        lines.append(template.format(n=3 + 7 * i, day=_DAYS[i % len(_DAYS)]))
    for greeting, name in itertools.product(_GREETINGS, _NAMES):
        lines.append(f"{greeting} My name is {name}.")
    for a, b in itertools.product(_CHAT, _GREETINGS):
        lines.append(f"{a} {b}")
    return lines


def train_demo_tokenizer(path: str | os.PathLike[str], vocab_size: int = 512) -> Path:
    """Train a tiny SentencePiece model on `demo_corpus()` and write it to `path` (well under a second).

    The special ids match the released vocabulary: 0 <unk> (EPAD in the stream), 1 <s>, 2 </s>, 3 <pad>.
    Byte fallback keeps any text encodable without <unk>, which would read as EPAD. Deterministic: one thread,
    no sampling of the input. `vocab_size` is a soft limit; the model may come out smaller.
    """
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(demo_corpus()),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        unk_id=TEXT_EPAD,
        bos_id=TEXT_BOS,
        eos_id=TEXT_EOS,
        pad_id=TEXT_PAD,
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


__all__ = ["SPECIAL_IDS", "SYSTEM_TAG", "TextTokenizer", "demo_corpus", "train_demo_tokenizer", "wrap_system_prompt"]
