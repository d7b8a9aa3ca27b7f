"""serving.detokenize against whole-text references: what a stream emits is the decode of all
its ids after the prompt's (cut at the first stop string), and a token costs the same late in a
long stream, or beside long stop strings, as it does early beside short ones.
"""

import random
import textwrap
import time
from pathlib import Path

import pytest
import sentencepiece as spm

from serving import detokenize
from serving.chat import CHAT_STOPS, chat_prompt
from serving.detokenize import REPLACEMENT_CHAR, SETTLE_EVERY, TextStream, first_stop, stop_tail

EOS = 2
WORDS = ["The", "capital", "of", "France", "is", "Paris;", "café", "5€", "😀", "naïve", "text,",
         "width=70", "wrap", "aaaa", "abab"]


def train_tokenizer(directory: Path) -> spm.SentencePieceProcessor:
  """A small BPE tokenizer with byte fallback (so "€" and "😀" are bytes) and the chat headers."""
  lines = [line for line in Path(textwrap.__file__).read_text().splitlines() if line.strip()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(directory / "spm"), model_type="bpe",
      vocab_size=384, byte_fallback=True, pad_id=0, bos_id=1, eos_id=EOS, unk_id=3,
      user_defined_symbols=CHAT_STOPS, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(directory / "spm.model"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> spm.SentencePieceProcessor:
  return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def decoder(tokenizer: spm.SentencePieceProcessor):
  return lambda ids: tokenizer.decode([i for i in ids if i != EOS])


def random_text(rng: random.Random, words: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(words))


def stream_all(stream: TextStream, token_ids: list[int]) -> tuple[list[str], bool]:
  """Every push's text (and the flush's, unless a stop hit) and whether a stop hit."""
  pieces = []
  for token_id in token_ids:
    text, stopped = stream.push(token_id)
    pieces.append(text)
    if stopped:
      return pieces, True
  return pieces + [stream.flush()], False


# --- stop strings ------------------------------------------------------------------------------

def test_stop_tail_is_the_longest_tail_that_begins_the_stop():
  rng = random.Random(0)
  for _ in range(3000):
    text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
    stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 8)))
    at_most = rng.randint(0, 10)
    expected = max(size for size in range(min(len(stop) - 1, len(text), at_most) + 1)
                   if text.endswith(stop[:size]))
    assert stop_tail(text, stop, at_most) == expected, (text, stop, at_most)


def test_first_stop_is_the_earliest_start_of_any_stop():
  rng = random.Random(1)
  for _ in range(1000):
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
    stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 3))) for _ in range(3)]
    starts = [i for i in range(len(text)) if any(text.startswith(s, i) for s in stops)]
    assert first_stop(text, stops) == (starts[0] if starts else None)


def test_a_stream_stops_where_the_whole_decode_first_holds_a_stop(tokenizer):
  """Stops long enough to straddle settled windows, short ones, byte-fallback ones; each push
  against the text of every id so far decoded at once."""
  decode, rng = decoder(tokenizer), random.Random(2)
  stopped_streams = 0
  for _ in range(150):
    prompt_ids = [1] + tokenizer.encode(random_text(rng, rng.randint(0, 4)))
    token_ids = tokenizer.encode(random_text(rng, 40))
    whole = decode(prompt_ids + token_ids)[len(decode(prompt_ids)):]
    start = rng.randrange(len(whole) - 2)
    stops = [whole[start:start + rng.randint(1, 60)] for _ in range(rng.randint(1, 3))]
    stops += rng.sample(["€", "😀 n", "wrap aaaa abab", "zz"], 1)
    stream = TextStream(decode, stops, prompt_ids)
    emitted = ""
    for count in range(1, len(token_ids) + 1):
      text, stopped = stream.push(token_ids[count - 1])
      emitted += text
      so_far = decode(prompt_ids + token_ids[:count])[len(decode(prompt_ids)):]
      cut = first_stop(so_far, stops)
      assert stopped == (cut is not None)
      if stopped:
        assert emitted == so_far[:cut]
        stopped_streams += 1
        break
      stable = so_far.rstrip(REPLACEMENT_CHAR)
      may_become_a_stop = max(size for size in range(len(stable) + 1) if any(
          size < len(stop) and stop.startswith(stable[len(stable) - size:]) for stop in stops))
      assert emitted == stable[:len(stable) - may_become_a_stop]
  assert stopped_streams >= 100


# --- the prompt's text and the completion's ---------------------------------------------------

@pytest.mark.parametrize("prompt", ["The capital of France is", "", "5€", "naïve 😀",
                                    chat_prompt([("user", "The capital of France?")])])
def test_prompt_text_and_completion_text_make_the_text_of_all_ids(tokenizer, prompt):
  """Issue 17: the first generated word keeps its leading space, as vLLM's does."""
  decode, rng = decoder(tokenizer), random.Random(prompt)
  prompt_ids = [1] + tokenizer.encode(prompt)
  euro = [tokenizer.piece_to_id(f"<0x{byte:02X}>") for byte in "€".encode()]
  completions = [tokenizer.encode(" Paris"), euro + tokenizer.encode(" 😀 Paris"),
                 *(tokenizer.encode(random_text(rng, 12)) for _ in range(30)),
                 *([rng.randrange(4, tokenizer.vocab_size()) for _ in range(12)]
                   for _ in range(30))]
  assert tokenizer.id_to_piece(completions[0][0]).startswith("\u2581")
  assert tokenizer.id_to_piece(completions[1][0]).startswith("<0x")
  for completion_ids in completions:
    pieces, _ = stream_all(TextStream(decode, [], prompt_ids), completion_ids)
    assert decode(prompt_ids) + "".join(pieces) == decode(prompt_ids + completion_ids)
  pieces, _ = stream_all(TextStream(decode, [], prompt_ids), completions[0])
  assert "".join(pieces) == (" Paris" if prompt else "Paris")  # no space opens the text


# --- cost per token ----------------------------------------------------------------------------

def letters(ids: list[int]) -> str:
  """A decoder whose token i is one letter: "a" for even ids, "b" for odd."""
  return "".join("ab"[i % 2] for i in ids)


def scanned_per_token(monkeypatch, tokens: int, stops: list[str]) -> list[int]:
  """Characters the stop search reads at each token of a stream of `tokens` "a"s."""
  scanned = [0]

  def count(chars: int):
    scanned[-1] += chars

  find, tail = detokenize.first_stop, detokenize.stop_tail
  monkeypatch.setattr(detokenize, "first_stop", lambda text, stops: count(
      len(text) * len(stops)) or find(text, stops))
  monkeypatch.setattr(detokenize, "stop_tail", lambda text, stop, at_most: count(
      min(len(text), at_most)) or tail(text, stop, at_most))
  stream = TextStream(letters, stops)
  for _ in range(tokens):
    assert not stream.push(0)[1]
    scanned.append(0)
  return scanned[:-1]


def test_the_stop_search_reads_the_same_per_token_late_in_a_stream(monkeypatch):
  stops = ["ab" * 128] * 4  # four stops of the longest length allowed, none completed by "a"s
  scanned = scanned_per_token(monkeypatch, 20_000, stops)
  assert max(scanned[-1000:]) == max(scanned[1000:2000])
  assert max(scanned) <= 4 * (255 + SETTLE_EVERY) + 4 * 2  # the live text, then a stop's start


def seconds_per_token(tokens: int, stops: list[str]) -> float:
  best = float("inf")
  for _ in range(3):
    stream = TextStream(letters, stops)
    start = time.perf_counter()
    for _ in range(tokens):
      stream.push(0)
    best = min(best, (time.perf_counter() - start) / tokens)
  return best


def test_a_token_costs_about_the_same_beside_long_stop_strings():
  """The old search tried every length of every stop at every token: 40x slower here."""
  short_stops = seconds_per_token(2_000, ["ab"] * 4)
  long_stops = seconds_per_token(2_000, ["ab" * 128] * 4)
  late_in_a_long_stream = seconds_per_token(20_000, ["ab" * 128] * 4)
  assert long_stops < 4 * short_stops
  assert late_in_a_long_stream < 2 * long_stops
