"""Bounded fuzzing of user input: every failure is our own error type with a message.

The config loader and overrides may only raise ``ConfigError``; the corpus reader only
``CorpusError`` -- never a bare exception from ml_collections, ast, soundfile or numpy.
"""

from __future__ import annotations

import io
import pathlib
import tempfile

import hypothesis.strategies as st
import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings

from fedprune_jax import config as config_lib
from fedprune_jax import validation
from fedprune_jax.data import librispeech
from fedprune_jax.data.records import CorpusError

FUZZ = settings(
  max_examples=60,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEYS = sorted(validation.FIELD_RULES) + [
  "model.overrides.num_layers",
  "specaug",
  "engine",
  "",
  "rounds.x",
  "client..optimizer",
  "no.such.field",
]
LITERALS = st.one_of(
  st.integers(-(10**20), 10**20).map(str),
  st.floats(allow_nan=True, allow_infinity=True).map(repr),
  st.sampled_from(
    ["None", "True", "'tiny'", "'all'", "()", "[1, 2]", "{'a': 1}", "float('nan')", "nan", "1e999"]
  ),
  st.sampled_from(["'sgd'", "'fedadam'", "'block:4x4'", "'2:4'", "(" * 300, "'" + "x" * 50]),
  st.text(max_size=20),
)


@FUZZ
@given(
  overrides=st.lists(
    st.one_of(st.tuples(st.sampled_from(KEYS), LITERALS).map("=".join), st.text(max_size=30)),
    max_size=4,
  ),
  name=st.sampled_from(["tiny_centralized", "tiny_federated"]),
)
def test_config_overrides_fail_only_with_config_error(overrides, name):
  try:
    cfg = config_lib.load_config(name, overrides)
  except config_lib.ConfigError as e:
    assert str(e)
    return
  assert validation.problems(cfg) == []  # whatever loads is valid


VALUES = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(),
  st.floats(allow_nan=True, allow_infinity=True),
  st.text(max_size=10),
  st.lists(st.integers(), max_size=3),
  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
  st.lists(st.floats(), max_size=3).map(np.array),
)


@FUZZ
@given(values=st.dictionaries(st.sampled_from(sorted(validation.FIELD_RULES)), VALUES, max_size=5))
def test_validation_of_any_value_is_a_message_never_a_crash(values):
  cfg = config_lib.load_config("tiny_federated", validate=False).to_dict()
  for path, value in values.items():
    node = cfg
    *parents, leaf = path.split(".")
    for part in parents:
      if not isinstance(node.get(part), dict):
        node[part] = {}
      node = node[part]
    node[leaf] = value
  for problem in validation.problems(cfg):
    assert isinstance(problem, str) and "=" in problem


@FUZZ
@given(
  source=st.sampled_from(
    [
      "",
      "get_config = 3",
      "def get_config():\n  return {'a': 1}\n",
      "def get_config():\n  raise KeyError('x')\n",
      "import nosuchmodule_xyz\n",
      "def get_config(:\n",
      "def get_config():\n  import ml_collections\n  return ml_collections.ConfigDict({'seed': -1})\n",
    ]
  )
  | st.text(max_size=60)
)
def test_config_files_fail_only_with_config_error(source):
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "fuzz_config.py"
    path.write_text(source)
    try:
      config_lib.load_config(str(path))
    except config_lib.ConfigError as e:
      assert "fuzz_config.py" in str(e)


def _flac_bytes(n: int = 1600, seed: int = 0) -> bytes:
  buf = io.BytesIO()
  audio = 0.1 * np.random.default_rng(seed).standard_normal(n)
  sf.write(buf, audio, 16000, format="FLAC", subtype="PCM_16")
  return buf.getvalue()


GOOD_FLAC = _flac_bytes()
FLAC_BYTES = st.one_of(
  st.just(GOOD_FLAC),
  st.binary(max_size=200),
  st.integers(0, len(GOOD_FLAC)).map(lambda k: GOOD_FLAC[:k]),  # truncated
  st.tuples(st.integers(0, len(GOOD_FLAC) - 1), st.integers(0, 255)).map(
    lambda p: GOOD_FLAC[: p[0]] + bytes([p[1]]) + GOOD_FLAC[p[0] + 1 :]
  ),  # one byte changed
)
TRANSCRIPT_LINES = st.one_of(
  st.just("19-198-0000 HELLO WORLD"),
  st.just("19-198-0000 hello"),
  st.just("19-198-0001 IT'S"),
  st.just("19-198-0000"),
  st.just(""),
  st.text(max_size=30),
)


@FUZZ
@given(
  flac=FLAC_BYTES,
  lines=st.lists(TRANSCRIPT_LINES, min_size=0, max_size=3),
  raw=st.one_of(st.none(), st.binary(max_size=40)),
  strict=st.booleans(),
)
def test_corpus_reader_fails_only_with_corpus_error(flac, lines, raw, strict):
  with tempfile.TemporaryDirectory() as d:
    chapter = pathlib.Path(d) / "train" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198-0000.flac").write_bytes(flac)
    trans = chapter / "19-198.trans.txt"
    if raw is None:
      trans.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    else:
      trans.write_bytes(raw)
    problems: list[CorpusError] = []
    try:
      utts = list(librispeech.read_split(chapter.parent.parent, strict=strict, problems=problems))
    except CorpusError as e:
      assert str(e)
      return
    for u in utts:
      assert u.audio.dtype == np.float32 and np.all(np.isfinite(u.audio))
    assert all(isinstance(p, CorpusError) and str(p) for p in problems)
