"""Text normalization: Unicode NFC, whitespace and control characters, boilerplate lines."""

import itertools
import re
import unicodedata

# Tab and newline stay: indentation and line structure carry meaning in code and prose alike.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_BLANK_RUN = re.compile("\n\n\n\n+")  # spelled out: a literal prefix lets `re` skip ahead fast
BOILERPLATE_PHRASES = (
    "all rights reserved", "cookie policy", "uses cookies", "accept cookies", "privacy policy",
    "terms of use", "terms of service", "terms and conditions", "enable javascript",
    "javascript is disabled", "click here", "sign up for our newsletter",
    "subscribe to our newsletter", "share this article", "share on facebook", "follow us on",
    "skip to main content", "skip to content", "back to top", "powered by wordpress",
)
MAX_BOILERPLATE_LINE_WORDS = 20


def normalize_whitespace(text: str) -> str:
  """NFC, \\n line ends, no control or zero-width characters, exotic spaces as ' ', no trailing
  spaces on a line, and at most two blank lines in a row."""
  if not unicodedata.is_normalized("NFC", text):
    text = unicodedata.normalize("NFC", text)
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  text = _CONTROL.sub("", text)
  if not text.isascii():
    text = _UNICODE_SPACES.sub(" ", text)
  text = "\n".join(map(str.rstrip, text.split("\n"), itertools.repeat(" \t")))
  return _BLANK_RUN.sub("\n\n\n", text)


def is_boilerplate_line(line: str) -> bool:
  """A short line made of navigation, cookie or legal chrome (C4's line filter, widened)."""
  lowered = line.lower()
  return (any(phrase in lowered for phrase in BOILERPLATE_PHRASES)
          and len(line.split()) <= MAX_BOILERPLATE_LINE_WORDS)


def drop_boilerplate_lines(text: str) -> tuple[str, int]:
  """(text without boilerplate lines, number of lines dropped)."""
  lowered = text.lower()
  if not any(phrase in lowered for phrase in BOILERPLATE_PHRASES):
    return text, 0
  lines = text.split("\n")
  kept = [line for line in lines if not is_boilerplate_line(line)]
  return "\n".join(kept), len(lines) - len(kept)
