"""Text -> token ids as lm-evaluation-harness and Hugging Face tokenizers see it: a special
token's text (`</s>`) is that token, not its characters. The server's /tokenize and the
in-process multiple-choice evaluator both use this, so they score the same ids."""

import functools
import re

import sentencepiece as spm


@functools.lru_cache(maxsize=8)
def _special_pieces(tokenizer: spm.SentencePieceProcessor) -> tuple[dict[str, int],
                                                                     re.Pattern | None]:
  """The control pieces (bos, eos, pad) by their text, and a pattern that splits them out."""
  specials = {tokenizer.id_to_piece(i): i for i in range(tokenizer.vocab_size())
              if tokenizer.is_control(i)}
  if not specials:
    return specials, None
  longest_first = sorted(specials, key=len, reverse=True)
  return specials, re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")


def encode(tokenizer: spm.SentencePieceProcessor, text: str,
           add_special_tokens: bool = False) -> list[int]:
  """`text`'s ids; a control piece's text becomes its id, and `add_special_tokens` puts the
  bos id first (as a Llama tokenizer does)."""
  specials, pattern = _special_pieces(tokenizer)
  ids = [tokenizer.bos_id()] if add_special_tokens else []
  for part in pattern.split(text) if pattern else [text]:
    if part in specials:
      ids.append(specials[part])
    elif part:
      ids.extend(tokenizer.encode(part))
  return ids
