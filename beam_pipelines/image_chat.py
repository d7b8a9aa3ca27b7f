"""Image-text rows and OpenAI content parts -> (role, text) turns with `<|image|>` placeholders
plus the image sources in placeholder order: what the pipeline trains on and the server serves.

  {"image": SRC or [SRC, ...], "caption": str}       -> user `<|image|>`, assistant the caption
  {"image": ..., "messages": [{role, content}, ...]} -> an image at each `<|image|>` of a user
      turn, or every image before the first user turn's text where there is none
  {"messages": [...]} with user content a list of {"type": "text", "text"} and
      {"type": "image_url", "image_url": {"url": SRC}} parts: an image where each part sits

A leaf module: it imports only the chat template and the chat examples' BadRow.
"""

from beam_pipelines.chat_examples import BadRow, messages_of
from beam_pipelines.chat_template import IMAGE_TOKEN, ROLES

Messages = tuple[tuple[str, str], ...]


def content_of_parts(parts, where: str) -> tuple[str, list[str]]:
  """OpenAI content parts -> (text with a placeholder per image, image sources in order)."""
  if not isinstance(parts, list):
    raise BadRow("malformed_row", f"{where} must be a string or a list of content parts")
  texts, sources = [], []
  for i, part in enumerate(parts):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
      if IMAGE_TOKEN in part["text"]:
        raise BadRow("placeholder_in_text", f"{where}[{i}] holds the literal {IMAGE_TOKEN}; "
                     "send images as image_url parts and remove it from the text")
      texts.append(part["text"])
    elif kind == "image_url" and isinstance(part.get("image_url"), dict):
      sources.append(part["image_url"].get("url"))
      texts.append(IMAGE_TOKEN)
    else:
      raise BadRow("malformed_row", f"{where}[{i}] must be {{type: text, text}} or "
                   "{type: image_url, image_url: {url}}")
  return "".join(texts), sources


def messages_of_parts(value) -> tuple[Messages, list[str]]:
  """A message list whose contents may be part lists -> (turns, image sources)."""
  if not isinstance(value, list) or not value:
    raise BadRow("malformed_row", "`messages` must be a non-empty list of {role, content}")
  turns, sources = [], []
  for i, message in enumerate(value):
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
      raise BadRow("malformed_row", f"`messages[{i}]` must be an object with a string `role`")
    if message["role"] not in ROLES:
      raise BadRow("unknown_role", f"`messages[{i}]` has role {message['role']!r}; use one of "
                   f"{', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):
      if message["role"] != "user":
        raise BadRow("malformed_row", f"`messages[{i}]`: only user turns may hold images")
      content, found = content_of_parts(content, f"`messages[{i}].content`")
      sources += found
    elif not isinstance(content, str):
      raise BadRow("malformed_row", f"`messages[{i}].content` must be a string or parts")
    turns.append((message["role"], content))
  return tuple(turns), sources


def placed(messages: Messages, images: int) -> Messages:
  """Every image before the first user turn's text when no turn has a placeholder."""
  if any(IMAGE_TOKEN in content for _, content in messages):
    return messages
  first = next((i for i, (role, _) in enumerate(messages) if role == "user"), None)
  if first is None:
    raise BadRow("malformed_row", "the row has images but no user turn to hold them")
  role, content = messages[first]
  return (*messages[:first], (role, IMAGE_TOKEN * images + content), *messages[first + 1:])


def check_placeholders(messages: Messages, images: int) -> None:
  count = sum(content.count(IMAGE_TOKEN) for _, content in messages)
  if count != images:
    raise BadRow("placeholder_mismatch", f"the row has {count} {IMAGE_TOKEN} placeholders and "
                 f"{images} images; give one placeholder per image")
  if any(IMAGE_TOKEN in content for role, content in messages if role != "user"):
    raise BadRow("placeholder_mismatch", f"{IMAGE_TOKEN} sits outside a user turn; move it "
                 "into the user's text")


def image_chat_of_row(row) -> tuple[Messages, list[str]]:
  """A parsed JSON row -> (turns with one placeholder per image, image sources)."""
  if not isinstance(row, dict) or not ("image" in row or "messages" in row):
    raise BadRow("malformed_row", "a row needs `image` with `caption` or `messages`, or "
                 "`messages` with image_url parts")
  if "image" not in row:
    messages, sources = messages_of_parts(row["messages"])
  else:
    sources = row["image"] if isinstance(row["image"], list) else [row["image"]]
    if isinstance(row.get("caption"), str):
      messages = (("user", IMAGE_TOKEN * len(sources)), ("assistant", row["caption"]))
    elif "messages" in row:
      messages = placed(messages_of(row["messages"], "messages"), len(sources))
    else:
      raise BadRow("malformed_row", "a row with `image` needs a string `caption` or `messages`")
  check_placeholders(messages, len(sources))
  return messages, sources
