"""beam_pipelines.prepare_images (and images, image_chat): bad images dead-lettered by reason,
color modes and orientation against NumPy computations, records against SentencePiece ids."""

import base64
import io
import json
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
from PIL import Image

from beam_pipelines import (
  chat_template,
  dataset_manifest,
  image_chat,
  images,
  prepare_images,
  records,
  tfds_images,
)
from beam_pipelines.chat_examples import BadRow
from beam_pipelines.tokenizer_training import TRAINER_OPTIONS

SIZE, PATCH = 8, 4  # 4 patches per image


def encoded(array: np.ndarray | Image.Image, fmt="PNG", **save) -> bytes:
  image = array if isinstance(array, Image.Image) else Image.fromarray(array)
  buffer = io.BytesIO()
  image.save(buffer, fmt, **save)
  return buffer.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
  return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def gradient(height=SIZE, width=SIZE) -> np.ndarray:
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 20, y * 20, (x + y) * 7], -1).astype(np.uint8)


def test_cmyk_becomes_rgb_by_the_subtractive_formula():
  cmyk = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
  got = images.decode_image(
      encoded(Image.frombytes("CMYK", (SIZE, SIZE), cmyk.tobytes()), "TIFF"), SIZE)
  c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
  np.testing.assert_allclose(got, (255 - c) * (255 - k) / 255, atol=1)


def test_palette_with_transparency_is_laid_over_white():
  indices = np.zeros((SIZE, SIZE), np.uint8)
  indices[:, SIZE // 2:] = 1
  palette = Image.frombytes("P", (SIZE, SIZE), indices.tobytes())
  palette.putpalette([0, 0, 0, 200, 10, 30])
  want = np.full((SIZE, SIZE, 3), 255, np.uint8)  # index 0 transparent: white
  want[:, SIZE // 2:] = (200, 10, 30)
  got = images.decode_image(encoded(palette, transparency=0), SIZE)
  np.testing.assert_array_equal(got, want)


def test_alpha_blends_over_white_and_grayscale_repeats_into_three_channels():
  rgba = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
  alpha = rgba[..., 3:].astype(np.float64) / 255
  want = rgba[..., :3] * alpha + 255 * (1 - alpha)
  np.testing.assert_allclose(images.decode_image(encoded(rgba), SIZE), want, atol=1)
  gray = gradient()[..., 0]
  np.testing.assert_array_equal(images.decode_image(encoded(gray), SIZE),
                                np.repeat(gray[..., None], 3, -1))


def test_exif_orientation_6_rotates_the_stored_pixels_clockwise():
  stored = gradient(SIZE, SIZE * 2)  # 8 rows, 16 columns
  exif = Image.Exif()
  exif[0x0112] = 6
  got = images.decode_image(encoded(stored, exif=exif.tobytes()), SIZE)
  upright = np.rot90(stored, k=-1)  # 16 rows, 8 columns
  np.testing.assert_array_equal(got, upright[SIZE // 2:SIZE // 2 + SIZE])


def test_the_longer_side_is_cropped_at_the_center():
  wide = gradient(SIZE, 3 * SIZE)
  np.testing.assert_array_equal(images.decode_image(encoded(wide), SIZE), wide[:, SIZE:2 * SIZE])


def bad_image_bytes() -> dict[str, bytes]:
  png = encoded(gradient(16, 16))  # 256 pixels: under the tests' budget of 1000
  return {"truncated": png[:len(png) // 2], "corrupt": b"\x89PNG not really",
          "bomb": encoded(np.zeros((40, 40, 3), np.uint8)), "empty": b""}


@pytest.mark.parametrize("name, reason", [
    ("truncated", "unreadable_image"), ("corrupt", "unreadable_image"),
    ("bomb", "decompression_bomb"), ("empty", "zero_size")])
def test_each_bad_image_raises_its_reason(name, reason):
  with pytest.raises(images.BadImage) as error:
    images.decode_image(bad_image_bytes()[name], SIZE, max_pixels=1000)
  assert error.value.reason == reason


def test_remote_urls_are_never_fetched_and_data_urls_decode():
  with pytest.raises(images.BadImage, match="remote URL") as error:
    images.source_bytes("https://example.com/a.png")
  assert error.value.reason == "remote_url"
  png = encoded(gradient())
  assert images.source_bytes(data_url(png)) == png


@pytest.mark.parametrize("prefix", ["DATA:image/png;base64,", "Data:Image/PNG;Base64,",
                                    "data:;BASE64,"])
def test_a_data_url_decodes_whatever_the_case_of_its_scheme_type_and_base64(prefix):
  png = encoded(gradient())  # RFC 2397's literals are case-insensitive, as browsers read them
  assert images.source_bytes(prefix + base64.b64encode(png).decode()) == png


def test_content_parts_put_a_placeholder_where_each_image_sits():
  row = {"messages": [{"role": "user", "content": [
      {"type": "text", "text": "left "}, {"type": "image_url", "image_url": {"url": "a.png"}},
      {"type": "text", "text": " right"}, {"type": "image_url", "image_url": {"url": "b.png"}}]},
      {"role": "assistant", "content": "two"}]}
  messages, sources = image_chat.image_chat_of_row(row)
  assert messages == (("user", "left <|image|> right<|image|>"), ("assistant", "two"))
  assert sources == ["a.png", "b.png"]


def test_an_image_without_a_placeholder_goes_before_the_first_user_text():
  row = {"image": "a.png", "messages": [{"role": "system", "content": "s"},
                                        {"role": "user", "content": "what?"},
                                        {"role": "assistant", "content": "x"}]}
  assert image_chat.image_chat_of_row(row)[0][1] == ("user", "<|image|>what?")


@pytest.mark.parametrize("row, reason", [
    ({"image": ["a.png", "b.png"], "messages": [{"role": "user", "content": "<|image|> q"},
                                                {"role": "assistant", "content": "a"}]},
     "placeholder_mismatch"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<|image|>"}]}]},
     "placeholder_in_text"),
])
def test_placeholder_errors_name_their_reason(row, reason):
  with pytest.raises(BadRow) as error:
    image_chat.image_chat_of_row(row)
  assert error.value.reason == reason


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
  directory = tmp_path_factory.mktemp("tokenizer")
  lines = [line for line in Path(textwrap.__file__).read_text().splitlines() if line.strip()]
  options = TRAINER_OPTIONS | {"model_type": "bpe", "vocab_size": 400,
                               "user_defined_symbols": ["\n", *chat_template.RESERVED_TOKENS]}
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                 model_prefix=str(directory / "tokenizer"), **options)
  proto = (directory / records.TOKENIZER_NAME).read_bytes()
  entry = dataset_manifest.tokenizer_entry(proto, "bpe", list(records.RESERVED_TOKENS))
  (directory / records.MANIFEST_NAME).write_text(json.dumps({"tokenizer": entry}))
  return directory


def test_pipeline_writes_good_rows_and_dead_letters_each_bad_image(tmp_path, tokenizer_dir):
  inputs = tmp_path / "in"
  inputs.mkdir()
  good = gradient(12, 8)
  (inputs / "good.png").write_bytes(encoded(good))
  for name, data in bad_image_bytes().items():
    (inputs / f"{name}.png").write_bytes(data)
  rows = [{"image": "good.png", "caption": "a gradient"},
          {"messages": [{"role": "user", "content": [
              {"type": "text", "text": "what is it?"},
              {"type": "image_url", "image_url": {"url": data_url(encoded(good))}}]},
              {"role": "assistant", "content": "a gradient"}]},
          {"image": "truncated.png", "caption": "x"}, {"image": "corrupt.png", "caption": "x"},
          {"image": "bomb.png", "caption": "x"}, {"image": "empty.png", "caption": "x"},
          {"image": ["good.png", "good.png"], "caption": "two"}]
  (inputs / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = tmp_path / "out"
  manifest = prepare_images.run([str(inputs / "rows.jsonl")], str(out),
                                tokenizer=str(tokenizer_dir), image_size=SIZE, patch_size=PATCH,
                                seq_len=48, max_image_pixels=1000, validation_fraction=0.0)
  dead = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
  assert {(d["line"], d["reason"]) for d in dead} == {
      (3, "unreadable_image"), (4, "unreadable_image"), (5, "decompression_bomb"),
      (6, "zero_size"), (7, "too_many_images")}
  report = manifest["report"]
  assert (report["images_in"], report["images_out"], report["rows_in"]) == (8, 2, 7)
  assert report["dead_letters_by_reason"] == {"decompression_bomb": 1, "too_many_images": 1,
                                              "unreadable_image": 2, "zero_size": 1}
  fields = records.fields_of_manifest(manifest)
  written = [r for name in manifest["splits"]["train"]["shards"]
             for r in records.read_shard(str(out / name), fields)]
  assert len(written) == 2
  sp = spm.SentencePieceProcessor(model_file=str(out / records.TOKENIZER_NAME))
  piece, newline = sp.piece_to_id, sp.encode("\n")
  patches = [piece(chat_template.IMAGE_TOKEN)] * (SIZE // PATCH) ** 2
  answer = sp.encode("a gradient")
  reply = [piece("<|assistant|>"), *answer, piece("<|end|>"), *newline]
  reply_mask = [0] + [1] * (len(answer) + 1) + [0] * len(newline)
  prompts = {"caption": [sp.bos_id(), piece("<|user|>"), *patches],
             "parts": [sp.bos_id(), piece("<|user|>"), *sp.encode("what is it?"), *patches]}
  got = {}
  for record in written:
    np.testing.assert_array_equal(record["image"], good[2:10])
    length = int(record["segment_ids"].sum())
    got[tuple(int(t) for t in record["tokens"][:length])] = list(record["loss_mask"][:length])
    np.testing.assert_array_equal(record["positions"][:length], np.arange(length))
  for prompt in prompts.values():
    ids = (*prompt, piece("<|end|>"), *newline, *reply)
    assert got[ids] == [0] * (len(ids) - len(reply)) + reply_mask


class LabeledSource(list):
  """A TFDS data source stand-in: examples by index, and class names in its dataset info."""
  dataset_info = types.SimpleNamespace(
      features={"label": types.SimpleNamespace(names=["cat", "dog"])})


def test_a_tfds_split_becomes_question_rows_named_by_class_with_bad_examples_dead_lettered(
    tmp_path, tokenizer_dir):
  gray = gradient(12, 8)[..., :1]  # [12, 8, 1]: the shorter side is already SIZE
  examples = LabeledSource([{"image": gray, "label": 1}, {"label": 0},
                            {"image": gradient(), "label": 0},
                            {"image": gradient().astype(np.float32), "label": 0}])
  out = tmp_path / "out"
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    manifest = prepare_images.run(
        ["tfds:mnist:train"], str(out), tokenizer=str(tokenizer_dir), image_size=SIZE,
        patch_size=PATCH, seq_len=48, validation_fraction=0.0,
        tfds_fields=tfds_images.Fields(question="What animal?"))
  dead = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
  assert {(d["line"], d["reason"]) for d in dead} == {(1, "malformed_row"),
                                                      (3, "unreadable_image")}
  assert all(d["file"] == "tfds:mnist:train" for d in dead)
  fields = records.fields_of_manifest(manifest)
  written = [r for name in manifest["splits"]["train"]["shards"]
             for r in records.read_shard(str(out / name), fields)]
  sp = spm.SentencePieceProcessor(model_file=str(out / records.TOKENIZER_NAME))
  replies = {}
  for record in written:
    supervised = record["tokens"][record["loss_mask"] == 1]
    replies[sp.decode([int(t) for t in supervised[:-1]])] = record["image"]  # less <|end|>
  assert sorted(replies) == ["cat", "dog"]
  np.testing.assert_array_equal(replies["dog"], np.repeat(gray[2:10], 3, axis=-1))
  np.testing.assert_array_equal(replies["cat"], gradient())
  question = sp.encode("What animal?")
  assert all(np.isin(question, record["tokens"]).all() for record in written)


def test_a_bad_image_file_is_named_by_its_path_without_pillows_object_repr(tmp_path):
  (tmp_path / "corrupt.png").write_bytes(bad_image_bytes()["corrupt"])
  settings = prepare_images.Settings(image_size=SIZE, patch_size=PATCH, max_images=1,
                                     max_image_pixels=None, seq_len=48)
  with pytest.raises(images.BadImage) as error:
    prepare_images.pixels_of("corrupt.png", tmp_path, settings)
  assert error.value.reason == "unreadable_image"
  assert str(error.value) == (
      f"{tmp_path}/corrupt.png: Pillow cannot decode the image (cannot identify image file); "
      "the file is truncated, corrupt or not an image")


def test_images_with_more_patches_than_seq_len_are_refused_before_reading(tmp_path):
  with pytest.raises(ValueError, match="--image_size 64 / --patch_size 4 makes 256 patches per "
                     "image, which leave no room for text in --seq_len 64"):
    prepare_images.run([f"{tmp_path}/nothing/*.jsonl"], str(tmp_path / "out"),
                       tokenizer=str(tmp_path), image_size=64, patch_size=4, seq_len=64)


def test_rows_without_images_make_no_dataset_and_the_output_is_not_written(tmp_path,
                                                                           tokenizer_dir):
  (tmp_path / "text.jsonl").write_text(json.dumps({"text": "no image here"}) + "\n")
  (tmp_path / "empty.jsonl").write_bytes(b"")
  output_dir = tmp_path / "out"
  with pytest.raises(ValueError) as error:
    prepare_images.run([f"{tmp_path}/*.jsonl"], str(output_dir), tokenizer=str(tokenizer_dir),
                       image_size=SIZE, patch_size=PATCH, seq_len=48)
  [kept] = tmp_path.glob("out.tmp-*")
  assert str(error.value) == (
      "no train sequences were produced: 1 row read from 2 files (1 empty), all dropped: "
      f"1 malformed_row; see {kept}/dead_letter.jsonl and report.md beside it (--output_dir "
      f"{output_dir} is as it was)")
  assert not output_dir.exists()
  assert sorted(p.name for p in kept.iterdir()) == ["dead_letter.jsonl", "report.md"]


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, tokenizer_dir):
  (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
  with pytest.raises(ValueError, match=f"--output_dir {tmp_path}/rows.jsonl is a file"):
    prepare_images.run([str(tmp_path / "rows.jsonl")], str(tmp_path / "rows.jsonl"),
                       tokenizer=str(tokenizer_dir), image_size=SIZE, patch_size=PATCH,
                       overwrite=True)
  assert (tmp_path / "rows.jsonl").is_file()
