"""PII scrubbing: e-mail addresses, IP addresses and phone numbers become placeholder tokens."""

import re

EMAIL_TOKEN = "<|email|>"
IP_TOKEN = "<|ip_address|>"
PHONE_TOKEN = "<|phone|>"
PLACEHOLDERS = (EMAIL_TOKEN, IP_TOKEN, PHONE_TOKEN)

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.]*\w)")
_HEX = r"[0-9A-Fa-f]{1,4}"
# Compressed forms need three groups: `a::b` is a C++ scope or a slice far more often than an address.
_IPV6 = re.compile(rf"(?<![\w:])(?:(?:{_HEX}:){{7}}{_HEX}|(?:{_HEX}:){{2,6}}(?::{_HEX}){{1,5}}"
                   rf"|{_HEX}:(?::{_HEX}){{2,5}}|(?:{_HEX}:){{3,7}}:)(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
                    r"(?![\w])|(?<![\w+])\+\d{1,3}(?:[ .-]\d{2,4}){2,4}(?![\w])")


# Cheap patterns that every match of the strict ones contains: only lines holding a hint are
# searched with the strict patterns, which keeps scrubbing fast on text with no PII at all.
_EMAIL_HINT = re.compile(r"@[A-Za-z0-9-]+\.")
_IPV4_HINT = re.compile(r"\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_PHONE_HINT = re.compile(r"\d{3}[ .-]\d{4}|\+\d")
# The phone hint starts with no literal that `re` can skip ahead to, so on ASCII text it runs on
# bytes with every digit written as 0 (same positions), where it starts with literals.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_PHONE_ASCII_HINT = re.compile(rb"000[ .-]0000|\+0")


def substitute_in_hinted_lines(text: str, hint: re.Pattern, pattern: re.Pattern, token: str,
                               hint_text: str | bytes | None = None) -> tuple[str, int]:
  """pattern.subn(token, text), applied only to the lines where `hint` matches `hint_text`
  (text itself, or a view of it with the same positions). Hints never span lines, so each
  search resumes at the end of the line just scrubbed."""
  hint_text = text if hint_text is None else hint_text
  pieces, done, replaced = [], 0, 0
  while (match := hint.search(hint_text, done)) is not None:
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    end = len(text) if end < 0 else end
    line, count = pattern.subn(token, text[start:end])
    pieces += [text[done:start], line]
    replaced += count
    done = end
  if not pieces:
    return text, 0
  pieces.append(text[done:])
  return "".join(pieces), replaced


def scrub(text: str) -> tuple[str, dict[str, int]]:
  """(text with each e-mail, IP address and phone number replaced, replacements per kind)."""
  text, emails = substitute_in_hinted_lines(text, _EMAIL_HINT, _EMAIL, EMAIL_TOKEN)
  text, ipv4 = substitute_in_hinted_lines(text, _IPV4_HINT, _IPV4, IP_TOKEN)
  text, ipv6 = substitute_in_hinted_lines(text, _IPV6_HINT, _IPV6, IP_TOKEN)
  if text.isascii():
    digits_as_zero = text.encode("ascii").translate(_DIGITS_AS_ZERO)
    text, phones = substitute_in_hinted_lines(text, _PHONE_ASCII_HINT, _PHONE, PHONE_TOKEN,
                                              digits_as_zero)
  else:
    text, phones = substitute_in_hinted_lines(text, _PHONE_HINT, _PHONE, PHONE_TOKEN)
  return text, {"email": emails, "ip_address": ipv4 + ipv6, "phone": phones}
