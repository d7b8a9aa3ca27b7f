"""Language identification with py3langid, whose model ships inside the package.

The packaged model is 68 MB of NumPy arrays compressed with LZMA; decompressing it takes each
worker ~0.3 s of CPU. A run therefore unpacks it once, in the background while the pipeline is
built and its workers start, into a temporary file that workers on the same machine load
directly (waiting for it if it is still being written); a worker that cannot see the file or
its partial predecessor (a remote runner) loads the packaged model as before.
"""

import array
import contextlib
import functools
import lzma
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np

LANGID_CHARS = 2000
# The codes the packaged model can return (its `classes`; a test checks they match), known here
# without unpacking it, so --languages is checked before a run.
LANGUAGES = frozenset("""
    ace af am an ar ary arz as az ba bcl be bg bn br bs ca crh cs cy da de dz el en eo es et eu
    ext fa fi fo fr fuv fy ga gcf gcr gd gl gom grc gu gug guw ha hbo he hi hr ht hu hy id ig is
    it ja jv ka kab kik kk km kn ko ku ky la lb lg lij ln lo lt ltg lv mg mk ml mn mr ms mt my ne
    nl nn no nso oc om or pa pcm pl ps pt qu ro ru rw sa sdh se si sk sl sn so sq sr st sv sw ta
    te tg th tk tl tr tt ug uk ur uz uzs vec vi vo wa wuu xh yo yue zh zu zxx""".split())
UNPACKED_NAME = "py3langid-model.npz"
_ARRAY_TYPECODES = {2: "H", 4: "I", 8: "L"}


def packaged_model_path() -> str:
  from py3langid.langid import MODEL_DIR, MODEL_FILE  # pylint: disable=import-outside-toplevel
  return str(MODEL_DIR / MODEL_FILE)


def partial_path(path: str) -> str:
  return f"{path}.partial"


def write_unpacked_model(path: str) -> None:
  """Writes the packaged model (an npz inside LZMA) as the plain npz at `path`, through
  partial_path(path), which exists exactly while the writing is under way."""
  try:
    with lzma.open(packaged_model_path()) as packed, open(partial_path(path), "wb") as unpacked:
      shutil.copyfileobj(packed, unpacked, 1 << 20)
    os.replace(partial_path(path), path)
  finally:
    if os.path.exists(partial_path(path)):
      os.remove(partial_path(path))


@contextlib.contextmanager
def unpacked_model() -> Iterator[str]:
  """Yields the path in a temporary directory to which a background thread (LZMA releases the
  GIL) is writing the unpacked model; removed on exit."""
  with tempfile.TemporaryDirectory(prefix="maxlm-langid-") as directory:
    path = os.path.join(directory, UNPACKED_NAME)
    open(partial_path(path), "wb").close()  # from now on readers wait rather than fall back
    writer = threading.Thread(target=write_unpacked_model, args=(path,), daemon=True)
    writer.start()
    try:
      yield path
    finally:
      writer.join()


def wait_for(path: str, timeout_s: float = 120.0) -> bool:
  """Whether `path` exists once no partial file says it is still being written."""
  deadline = time.monotonic() + timeout_s
  while os.path.exists(partial_path(path)) and time.monotonic() < deadline:
    time.sleep(0.01)
  return os.path.exists(path)


def stdlib_array(values: np.ndarray) -> array.array:
  """The unsigned integer array as py3langid's DFA walk wants it."""
  result = array.array(_ARRAY_TYPECODES[values.dtype.itemsize])
  result.frombytes(memoryview(np.ascontiguousarray(values)).cast("B"))
  return result


@functools.cache
def language_identifier(unpacked: str | None = None):
  """py3langid's identifier, from the unpacked model file when it exists, else from the model
  inside the package (nothing is ever downloaded)."""
  from py3langid.langid import LanguageIdentifier  # pylint: disable=import-outside-toplevel
  if not (unpacked and wait_for(unpacked)):
    return LanguageIdentifier.from_model_file(packaged_model_path(), norm_probs=True)
  with np.load(unpacked, allow_pickle=False) as model:
    return LanguageIdentifier(
        np.asarray(model["ptc"]), np.asarray(model["pc"]), model["classes"].tolist(),
        stdlib_array(model["nextmove"]), model["out_feat"].tolist(), norm_probs=True,
        tk_row=stdlib_array(model["nextmove_row"]))


def identify_language(text: str, unpacked: str | None = None) -> tuple[str, float]:
  """(ISO 639-1 code, probability) of the text's first LANGID_CHARS characters; `unpacked`
  names an unpacked model file (see `unpacked_model`), if there is one."""
  language, probability = language_identifier(unpacked).classify(text[:LANGID_CHARS])
  return language, float(probability)
