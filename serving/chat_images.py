"""The images of a chat request: `image_url` parts -> uint8 pixels, decoded exactly as the data
pipeline decodes them (beam_pipelines.images), or an OpenAI 400 naming what to change.

Data URLs (base64 PNG/JPEG/WebP) are decoded; a remote URL is fetched only when
--allowed_media_domains names its host, and refused otherwise, so by default the server never
reaches out to the network for a request.
"""

import dataclasses
import urllib.parse
import urllib.request

import numpy as np

from beam_pipelines import images
from serving.openai_api import ChatMessage, ImagePart, OpenAIError

FETCH_TIMEOUT_S = 10.0
MAX_FETCH_BYTES = 20 << 20


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
  """What a request's images may be: how many, from which remote hosts, and their size."""
  max_images_per_request: int = 4
  allowed_media_domains: tuple[str, ...] = ()
  max_image_pixels: int | None = None


DEFAULT_MEDIA = MediaPolicy()


def host_allowed(url: str, domains: tuple[str, ...]) -> bool:
  """Whether url's host is one of `domains` or under one (`cdn.example.com` under
  `example.com`)."""
  host = (urllib.parse.urlsplit(url).hostname or "").lower()
  return any(host == d or host.endswith("." + d) for d in (d.lower() for d in domains))


class _RedirectsWithin(urllib.request.HTTPRedirectHandler):
  """Follows a redirect only to an http(s) URL whose host `domains` allow: an allowed host
  must not hand the server on to any other (an internal address, say)."""

  def __init__(self, domains: tuple[str, ...]):
    super().__init__()
    self.domains = domains

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    if not (images.is_remote(newurl) and host_allowed(newurl, self.domains)):
      host = urllib.parse.urlsplit(newurl).hostname
      raise images.BadImage("remote_url", f"{req.full_url[:80]} redirects to host {host!r}, "
                            "which --allowed_media_domains does not name; not fetched")
    return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, domains: tuple[str, ...]) -> bytes:
  """The bytes at `url` (whose host `domains` allow), following redirects within `domains`."""
  opener = urllib.request.build_opener(_RedirectsWithin(domains))
  try:
    with opener.open(url, timeout=FETCH_TIMEOUT_S) as response:
      data = response.read(MAX_FETCH_BYTES + 1)
  except OSError as e:
    raise images.BadImage("image_not_found", f"cannot fetch {url[:80]} ({e})") from None
  if len(data) > MAX_FETCH_BYTES:
    raise images.BadImage("decompression_bomb", f"{url[:80]} is over {MAX_FETCH_BYTES} bytes")
  return data


def image_bytes(url: str, policy: MediaPolicy) -> bytes:
  if images.is_data_url(url):
    return images.data_url_bytes(url)
  if images.is_remote(url) and host_allowed(url, policy.allowed_media_domains):
    return fetch(url, policy.allowed_media_domains)
  if images.is_remote(url):
    host = urllib.parse.urlsplit(url).hostname
    raise images.BadImage("remote_url", f"remote image URLs are not fetched (host {host!r}); "
                          "send the image as a base64 data: URL, or start the server with "
                          f"--allowed_media_domains={host}")
  raise images.BadImage("not_an_image_url", "an image_url must be a data: URL "
                        "(data:image/png;base64,...)")


def image_urls(messages: list[ChatMessage]) -> list[tuple[int, str]]:
  """(message index, url) of every image part, in order."""
  return [(index, part.image_url.url) for index, message in enumerate(messages)
          if not isinstance(message.content, str)
          for part in message.content if isinstance(part, ImagePart)]


def request_images(messages: list[ChatMessage], policy: MediaPolicy,
                   image_size: int | None) -> list[np.ndarray]:
  """The request's images as uint8 [image_size, image_size, 3] each; OpenAIError 400 when
  there are too many, one cannot be decoded, or the model takes none (image_size None)."""
  urls = image_urls(messages)
  if not urls:
    return []
  if image_size is None:
    raise OpenAIError(400, "this model does not take images; send text only, or serve a "
                      "checkpoint with a vision tower", param="messages")
  if len(urls) > policy.max_images_per_request:
    raise OpenAIError(400, f"the request has {len(urls)} images, over the server's "
                      f"--max_images_per_request {policy.max_images_per_request}; send fewer",
                      param="messages")
  decoded = []
  for index, url in urls:
    try:
      decoded.append(images.decode_image(image_bytes(url, policy), image_size,
                                         policy.max_image_pixels))
    except images.BadImage as e:
      raise OpenAIError(400, f"messages[{index}]: {e}", param=f"messages[{index}].content",
                        code=e.reason) from None
  return decoded

