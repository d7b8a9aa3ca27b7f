"""maxlm.user_cache: the cache root's precedence, and the other builds a new build reports."""

from pathlib import Path

from maxlm import user_cache


def test_the_root_is_maxlm_cache_then_xdg_then_home(monkeypatch, tmp_path):
  monkeypatch.setenv("MAXLM_CACHE", str(tmp_path / "m"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert user_cache.cache_root() == tmp_path / "m"
  monkeypatch.delenv("MAXLM_CACHE")
  assert user_cache.cache_root() == tmp_path / "x" / "maxlm"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert user_cache.cache_root() == Path.home() / ".cache" / "maxlm"


def make_build(path: Path, size: int) -> Path:
  (path / "train").mkdir(parents=True)
  (path / "train" / "shard-0").write_bytes(bytes(size))
  return path


def test_a_build_reports_the_finished_builds_of_its_kind_and_removes_none(tmp_path, capsys):
  built = tmp_path / "stdlib-py3.12-v4096-s256-h0.03-r5"
  older = make_build(tmp_path / "stdlib-py3.12-v4096-s256-h0.03-r4", 2**20)
  other = make_build(tmp_path / "stdlib-py3.12-v8192-s512-h0.03-r5", 2**19)
  make_build(tmp_path / "stdlib-py3.12-v4096-s256-h0.03-r5.partial", 10)
  make_build(tmp_path / "chat-py3.12-t0123-s256-n900-r3", 10)
  (tmp_path / "stdlib-notes.jsonl").write_text("a file, not a build")
  assert user_cache.other_builds(built) == [older, other]
  user_cache.report_other_builds(built)
  line = capsys.readouterr().out
  assert "2 other build(s) of this kind (1.5 MiB)" in line
  assert str(older) in line and str(other) in line and "chat-" not in line
  assert older.exists() and other.exists()


def test_nothing_is_said_in_an_empty_or_missing_cache(tmp_path, capsys):
  user_cache.report_other_builds(tmp_path / "stdlib-a-r5")
  user_cache.report_other_builds(tmp_path / "missing" / "stdlib-a-r5")
  assert capsys.readouterr().out == ""


def test_a_build_replaces_the_old_one_whole_and_a_failed_one_leaves_it_as_it_was(tmp_path):
  built = make_build(tmp_path / "stdlib-a-r5", 3)
  (tmp_path / "stdlib-a-r5.partial").mkdir()  # left by a killed build
  (tmp_path / "stdlib-a-r5.partial" / "stale").write_text("from the killed build")
  try:
    with user_cache.building(built) as partial:
      assert list(partial.iterdir()) == []
      (partial / "half").write_text("half-written")
      raise OSError("No space left on device")
  except OSError:
    pass
  assert sorted(p.name for p in tmp_path.iterdir()) == ["stdlib-a-r5"]
  assert (built / "train" / "shard-0").read_bytes() == bytes(3)
  with user_cache.building(built) as partial:
    (partial / "manifest.json").write_text("{}")
    assert not (built / "manifest.json").exists()  # nothing published before the body ends
  assert sorted(p.name for p in tmp_path.iterdir()) == ["stdlib-a-r5"]
  assert sorted(p.name for p in built.iterdir()) == ["manifest.json"]
