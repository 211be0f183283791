"""Issue 24: runs never lie. Every case of the issue through the CLI on one tiny trained workdir.

A silent wrong result (exit 0) before is now an error line, and the wrong result is not
produced; a traceback before is now one ``fedprune: error:`` line naming the field or file.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import MICRO_MODEL
from fedprune_jax import cli
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.errors import InputError
from fedprune_jax.io_utils import read_jsonl

SETS = [
  "rounds=2",
  "eval_every=0",
  "cohort_size=3",
  "data.batch_size=2",
  "data.num_buckets=1",
  "data.max_steps=1",
  "data.server_speakers=1",
  "data.eval_batch_size=4",
  "warm_start.steps=1",
  "warm_start.batch_size=2",
  "checkpoint_every=1",
  "engine.chunk_size=3",
  "pruning.target_sparsity=0.5",
  "pruning.pruning_rounds=2",
  "pruning.update_every=1",
  "pruning.refining_rounds=0",
  *(f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()),
]


def argv(corpus, workdir, *extra, command="federated"):
  out = [command, "--config", "fedprune_tiny", "--workdir", str(workdir)]
  for s in [f"data.root={corpus}", *SETS, *extra]:
    out += ["--set", s]
  return out


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
  """One finished federated pruning run: (corpus, workdir)."""
  workdir = tmp_path_factory.mktemp("reliability") / "run"
  assert cli.main(argv(tiny_corpus, workdir)) == 0
  return tiny_corpus, workdir


def _copy(workdir: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  shutil.copytree(workdir, dest)
  (dest / workdir_lib.LOCK).unlink(missing_ok=True)
  return dest


def _one_line(capsys, code, expected_code=2) -> str:
  err = capsys.readouterr().err
  assert code == expected_code, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fedprune: error: "), err
  assert "Traceback" not in err
  return lines[0]


def _npz(path: pathlib.Path, arrays: dict) -> str:
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return str(path)


def _mask_cases(run: pathlib.Path, tmp: pathlib.Path) -> dict[str, tuple[str, str]]:
  """name -> (mask file, text the error names)."""
  with np.load(run / "mask.npz") as data:
    mask = {k: data[k] for k in data.files}
  first = sorted(mask)[0]
  half = dict(sorted(mask.items())[: len(mask) // 2])
  (tmp / "masks").mkdir()
  t = tmp / "masks"
  truncated = t / "truncated.npz"
  truncated.write_bytes((run / "mask.npz").read_bytes()[:300])
  np.save(t / "mask.npy", mask[first])
  return {
    "partial": (_npz(t / "partial.npz", half), "has no entry for"),
    "empty": (_npz(t / "empty.npz", {}), "has no entry for"),
    "float": (_npz(t / "float.npz", {k: v.astype(np.float32) for k, v in mask.items()}), "dtype"),
    "all-false": (_npz(t / "zeros.npz", {k: np.zeros_like(v) for k, v in mask.items()}), "every"),
    "wrong-shape": (_npz(t / "shape.npz", {**mask, first: np.ones((2, 2), bool)}), "shape"),
    "wrong-key": (_npz(t / "key.npz", {**mask, "nope/kernel": np.ones(2, bool)}), "nope/kernel"),
    "not-npz": (str(run / "config.json"), "not an .npz"),
    "truncated": (str(truncated), "truncated.npz"),
    "npy": (str(t / "mask.npy"), "mask.npy"),
  }


def test_config_change_is_refused_not_resumed(trained, tmp_path, capsys):
  """Cases 1 and 15 (silent before): a workdir belongs to the config it was started with."""
  corpus, run = trained
  results = (run / "results.json").read_bytes()
  for extra, field in [
    (["pruning.target_sparsity=0.8"], "pruning.target_sparsity (0.5 -> 0.8)"),
    (["pruning.pattern='column'"], "pruning.pattern"),
    (["model.overrides.d_model=64"], "model.overrides.d_model (32 -> 64)"),
  ]:
    line = _one_line(capsys, cli.main(argv(corpus, run, *extra)))
    assert field in line and "--fresh" in line
  assert (run / "results.json").read_bytes() == results  # nothing was run
  assert json.loads((run / "config.json").read_text())["pruning"]["target_sparsity"] == 0.5
  # pruning=None: the dense config differs in the pruning section
  line = _one_line(capsys, cli.main(argv(corpus, run) + ["--set", "pruning=None"]))
  assert "pruning" in line
  # --fresh starts a copy over with the new config
  fresh = _copy(run, tmp_path / "fresh")
  # (its warm start, trained with seed 0, is kept: warm_start.seed=0 reuses it)
  assert cli.main(argv(corpus, fresh, "seed=1", "warm_start.seed=0") + ["--fresh"]) == 0
  capsys.readouterr()
  assert json.loads((fresh / "config.json").read_text())["seed"] == 1
  sha = [
    json.loads((w / "results.json").read_text())["train"]["params_sha256"] for w in (run, fresh)
  ]
  assert sha[0] != sha[1]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("error:coroutine .* was never awaited:RuntimeWarning")
def test_bad_inputs_are_one_line(trained, tmp_path, capsys):
  """Cases 3, 4, 10, 11, 12, 13, 15: one line naming the field or file; nothing trained."""
  corpus, run = trained
  w = tmp_path / "w"
  missing = tmp_path / "no" / "such_warm_start"
  regular = tmp_path / "afile"
  regular.write_text("x")
  garbage_ws = tmp_path / "garbage_ws"
  garbage_ws.mkdir()
  (garbage_ws / "junk").write_text("junk")
  cases = [
    # 3: a mistyped warm_start.path is not trained there
    (["warm_start.path=" + repr(str(missing))], ["warm_start.path", "does not exist"]),
    (["warm_start.path=" + repr(str(regular / "ws"))], ["warm_start.path", "afile"]),
    (["warm_start.path=" + repr(str(garbage_ws))], ["warm_start.path", "garbage_ws"]),
    # 13: a warm start of another model size
    (
      ["warm_start.path=" + repr(str(run / "checkpoint")), "model.overrides.d_model=64"],
      ["warm_start.path", "not a checkpoint of this model"],
    ),
    # 10: pattern values that passed validation and crashed after the data loaded
    (["pruning.pattern='block:0x4'"], ["pruning.pattern", "block dim"]),
    (["pruning.pattern='block:-2x4'"], ["pruning.pattern"]),
    (["pruning.pattern='block:axb'"], ["pruning.pattern"]),
    (["pruning.pattern='2:4'"], ["pruning.pattern='2:4'", "divisible by 4"]),  # kernel 3 wide
  ]
  # 4, 13, 15: mask files (pruning.mask_path is a field of fedprune_tiny)
  for name, (path, text) in _mask_cases(run, tmp_path).items():
    cases.append((["pruning.mask_path=" + repr(path)], [pathlib.Path(path).name, text]))
  for extra, texts in cases:
    line = _one_line(capsys, cli.main(argv(corpus, w, *extra)))
    gc.collect()  # a failed restore's unfinished orbax coroutines end (and must stay quiet) here
    for text in texts:
      assert text in line, (extra, line)
  assert not missing.exists() and not (w / "warm_start").exists()  # nothing was trained


def test_a_valid_mask_file_trains_with_its_sparsity(trained, tmp_path, capsys):
  """Case 4: the run trains the file's mask (frozen) and records its sparsity over every
  prunable param."""
  corpus, run = trained
  w = tmp_path / "frozen"
  mask = str(run / "mask.npz")
  assert cli.main(argv(corpus, w, f"pruning.mask_path={mask!r}")) == 0
  capsys.readouterr()
  with np.load(mask) as data:
    kept = sum(int(data[k].sum()) for k in data.files)
    total = sum(data[k].size for k in data.files)
  train = json.loads((w / "results.json").read_text())["train"]
  assert train["sparsity"] == pytest.approx(1 - kept / total, abs=1e-6)


def test_experiment_and_report_inputs(tmp_path, capsys):
  """Cases 11 and 12: checked before any run starts / read without a traceback."""
  runs = tmp_path / "runs"
  for args, text in [
    (["--seeds", "abc"], "--seeds 'abc'"),
    (["--seeds", "0,,1"], "--seeds '0,,1'"),
    (["--seeds=-1"], "--seeds '-1'"),
    (["--seeds", "0", "--set", "rounds=-4"], "rounds=-4"),
    (["--setting", "full", "--data", str(tmp_path / "nowhere")], "nowhere"),
  ]:
    line = _one_line(capsys, cli.main(["experiment", "t1_pattern", "--runs", str(runs), *args]))
    assert text in line, line
  assert not (runs / "runs").exists()  # no run started
  runs.mkdir(exist_ok=True)
  (runs / "notes.json").write_text("{broken")  # unrelated: skipped
  line = _one_line(capsys, cli.main(["report", str(runs)]))
  assert "no experiment index" in line
  (runs / "t1_pattern.json").write_text("garbage")
  line = _one_line(capsys, cli.main(["report", str(runs)]))
  assert "t1_pattern.json" in line and "does not parse" in line
  (runs / "t1_pattern.json").write_text("{}")
  line = _one_line(capsys, cli.main(["report", str(runs)]))
  assert "t1_pattern.json" in line and "not an experiment index" in line


def test_report_skips_a_run_whose_results_are_not_the_finished_ones(trained, tmp_path, capsys):
  """Case 12: a truncated / empty / ``{}`` results.json is not a finished run (it was counted
  and crashed the report); the completion marker vouches for one results.json."""
  _, run = trained
  assert workdir_lib.incomplete(run) is None
  runs = tmp_path / "runs"
  (runs / "runs").mkdir(parents=True)
  entry = dict(arm="a", seed=0, dir="runs/a", state="done", row="a", col="", report=True)
  index = dict(experiment="t1_pattern", title="T", question="", runs=[entry], comparisons=[])
  (runs / "t1_pattern.json").write_text(json.dumps(index))
  copy = _copy(run, runs / "runs" / "a")
  assert cli.main(["report", str(runs)]) == 0
  assert "| a | - |" not in capsys.readouterr().out  # its numbers are in the table
  for text in ("", "{}", (run / "results.json").read_text()[:100]):
    (copy / "results.json").write_text(text)
    assert workdir_lib.incomplete(copy) is not None
    assert cli.main(["report", str(runs)]) == 0
    assert "| a | - |" in capsys.readouterr().out  # pending: no numbers


def test_rerun_without_checkpoint_starts_the_log_afresh(trained, tmp_path, capsys):
  """Case 6: killed before its first checkpoint, a rerun logged rounds 0, 1, 0, 1."""
  corpus, run = trained
  w = _copy(run, tmp_path / "w")
  for name in ("rounds", "checkpoint", "results.json", "done.json", "mask.npz"):
    p = w / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  assert [r["round"] for r in read_jsonl(w / "metrics.jsonl") if "round" in r] == [0, 1]
  assert cli.main(argv(corpus, w)) == 0
  capsys.readouterr()
  assert [r["round"] for r in read_jsonl(w / "metrics.jsonl") if "round" in r] == [0, 1]
  same = json.loads((run / "results.json").read_text())["train"]["params_sha256"]
  assert json.loads((w / "results.json").read_text())["train"]["params_sha256"] == same


def test_concurrent_run_is_refused_and_a_stale_lock_taken_over(trained, tmp_path, capsys):
  """Case 7: a second run on a workdir in use is refused; a dead process's lock is free."""
  corpus, run = trained
  w = _copy(run, tmp_path / "w")
  log = (w / "metrics.jsonl").read_bytes()
  with workdir_lib.lock(w):  # another run holds the workdir
    line = _one_line(capsys, cli.main(argv(corpus, w)))
  assert "in use" in line and str(os.getpid()) in line
  assert (w / "metrics.jsonl").read_bytes() == log
  # the lock file of a killed process (its pid, no lock held) is taken over
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (w / workdir_lib.LOCK).write_text(f"{dead.pid}\n")
  with workdir_lib.lock(w):
    assert (w / workdir_lib.LOCK).read_text() == f"{os.getpid()}\n"


# a failed restore's late orbax noise ("Event loop is closed", unraisable) is the CLI's to drop
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_resume_from_a_corrupt_checkpoint_equals_resume_from_the_previous(
  trained, tmp_path, capsys
):
  """Case 9: a truncated latest round checkpoint falls back to the one before, which gives the
  same run as resuming from it directly (and as the uninterrupted run)."""
  corpus, run = trained
  corrupt = _copy(run, tmp_path / "corrupt")
  previous = _copy(run, tmp_path / "previous")
  for f in (corrupt / "rounds" / "2" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:8])
  shutil.rmtree(previous / "rounds" / "2")
  assert cli.main(argv(corpus, corrupt)) == 0
  err = capsys.readouterr().err
  assert "resuming from the checkpoint after round 1" in err and "round 2" in err
  assert cli.main(argv(corpus, previous)) == 0
  capsys.readouterr()
  shas = [
    json.loads((w / "results.json").read_text())["train"]["params_sha256"]
    for w in (run, corrupt, previous)
  ]
  assert shas[0] == shas[1] == shas[2]
  assert [r["round"] for r in read_jsonl(corrupt / "metrics.jsonl") if "round" in r] == [0, 1]
  assert workdir_lib.incomplete(corrupt) is None
  # no checkpoint restores: one line suggesting --fresh
  for f in (corrupt / "rounds").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"")
  line = _one_line(capsys, cli.main(argv(corpus, corrupt, "rounds=3")))
  assert "no round checkpoint" in line and "--fresh" in line


def test_short_utterance_is_an_error_naming_its_file(tiny_corpus, tmp_path, capsys, caplog):
  """Case 5: 0.05 s of audio under a transcript CTC cannot emit."""
  import soundfile

  corpus = tmp_path / "corpus"
  shutil.copytree(tiny_corpus, corpus, ignore=shutil.ignore_patterns(".features"))
  flac = sorted((corpus / "train").rglob("*.flac"))[0]
  soundfile.write(flac, np.zeros(800, np.float32), 16000, format="FLAC", subtype="PCM_16")
  line = _one_line(capsys, cli.main(argv(corpus, tmp_path / "w")))
  assert flac.name in line and "too short" in line
  # data.skip_unalignable (the demo's setting for its embedded corpus): that file alone is dropped
  from fedprune_jax import config as config_lib
  from fedprune_jax import task

  sets = [f"data.root={corpus}", *SETS]
  every = task.load_split(config_lib.load_config("fedprune_tiny", sets), "train")
  caplog.clear()
  cfg = config_lib.load_config("fedprune_tiny", [*sets, "data.skip_unalignable=True"])
  kept = task.load_train_split(cfg)
  assert set(every.utt_ids) - set(kept.utt_ids) == {flac.name.removesuffix(".flac")}
  assert flac.name in caplog.text


def test_unalignable_utterances_are_skipped_when_not_strict(caplog):
  from fedprune_jax.data import alignable, batching, feature_sets

  examples = [
    batching.Example(np.zeros((40, 80), np.float32), np.array([1, 2, 3], np.int32)),  # T'=10
    batching.Example(np.zeros((12, 80), np.float32), np.array([1, 1, 2], np.int32)),  # 3 < 4
    batching.Example(np.zeros((13, 80), np.float32), np.array([1, 1, 2], np.int32)),  # 4 >= 4
  ]
  fs = feature_sets.pack_examples(examples, ["s-c-0", "s-c-1", "s-c-2"], ["s", "s", "s"])
  assert alignable.unalignable(fs, "ctc") == [(1, 3, 4)]
  assert alignable.unalignable(fs, "rnnt") == []
  kept = alignable.check_alignable(fs, "ctc", "split", strict=False)
  assert list(kept.utt_ids) == ["s-c-0", "s-c-2"]
  assert "split/s/c/s-c-1.flac" in caplog.text


def test_eval_every_zero_means_never_in_centralized_training(tiny_corpus, tmp_path, capsys):
  """Case 16: ``train.eval_every=0`` (accepted by validation) divided by zero."""
  w = tmp_path / "c"
  sets = [f"data.root={tiny_corpus}", "train.eval_every=0", "train.steps=2", "data.batch_size=2"]
  sets += [f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()]
  args = ["train", "--workdir", str(w)] + [a for s in sets for a in ("--set", s)]
  assert cli.main(args) == 0
  capsys.readouterr()
  history = json.loads((w / "results.json").read_text())["history"]
  assert history == []  # no evaluation during training
  assert workdir_lib.incomplete(w) is None


def test_ctrl_c_before_the_command_is_one_line(monkeypatch, capsys):
  """Case 14 in-process: an interrupt while JAX is imported (before the command runs)."""
  from fedprune_jax import programs

  def interrupted():
    raise KeyboardInterrupt

  monkeypatch.setattr(programs, "enable_compilation_cache", interrupted)
  assert cli.main(["presets"]) == 130
  assert capsys.readouterr().err == cli.INTERRUPTED + "\n"


# The child says when ``cli.main`` has installed its SIGINT handler and the command is about to
# start (parse, import JAX, load data): the signal is sent then, not after a guessed delay.
_ANNOUNCE_THEN_MAIN = """
import sys
from fedprune_jax import cli

command = cli._main

def announced(argv):
  print("ready", flush=True)
  return command(argv)

cli._main = announced
sys.exit(cli.main())
"""


def test_ctrl_c_during_startup_subprocess(tiny_corpus, tmp_path):
  """Case 14: SIGINT while the command starts (parses, imports JAX, loads data) exits 130 with
  one line."""
  proc = subprocess.Popen(
    [
      sys.executable,
      "-c",
      _ANNOUNCE_THEN_MAIN,
      "train",
      "--workdir",
      str(tmp_path / "w"),
      "--set",
      f"data.root={tiny_corpus}",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "FEDPRUNE_JAX_CACHE": ""},
  )
  assert proc.stdout.readline() == "ready\n"  # main's handler is in place; the command starts
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert err == cli.INTERRUPTED + "\n"


_DISK_FULL_AT_FINAL_SAVE = """
import resource, signal, sys
from fedprune_jax import cli, job

save = job.task.save_params

def save_on_a_full_disk(path, params):
  if path.name == "checkpoint":  # the final save: a file-size limit stands in for a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000, 2_000))
  return save(path, params)

job.task.save_params = save_on_a_full_disk
sys.exit(cli.main())  # as the program: argv from sys.argv
"""


def test_disk_full_during_the_final_save_is_one_line(trained, tmp_path):
  """Case 8: one line, no asyncio noise, and the run is not marked finished."""
  corpus, run = trained
  w = _copy(run, tmp_path / "w")
  shutil.rmtree(w / "checkpoint")
  proc = subprocess.run(
    [sys.executable, "-c", _DISK_FULL_AT_FINAL_SAVE, *argv(corpus, w)],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    check=False,
  )
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "/s]" not in ln]  # no bars
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("fedprune: error: File too large") and "checkpoint" in lines[0]
  assert workdir_lib.incomplete(w) is not None and not (w / workdir_lib.MARKER).exists()


_KILLED_SUITE = """
import sys
from fedprune_jax import programs, suite
programs.enable_compilation_cache()  # as `fedprune experiment` does: the test's programs are there
sys.path.insert(0, sys.argv[3])
from test_reliability import kill_experiment
suite.run_experiment(kill_experiment(sys.argv[1]), sys.argv[2], progress=False)
"""


def kill_experiment(corpus: str):
  """Arm ``b`` starts from arm ``a``'s final model (as T6's ``central_server+fed``)."""
  from fedprune_jax import config as config_lib
  from fedprune_jax import suite

  base = config_lib.load_config("fedprune_tiny", [f"data.root={corpus}", *SETS])
  arms = (
    suite.Arm("a", {}),
    suite.Arm("b", {"warm_start.path": suite.From("a", "checkpoint")}),
  )
  return suite.Experiment(name="kill", title="kill", question="?", base=base, arms=arms, seeds=(0,))


def test_killed_between_checkpoint_and_marker_then_suite_rerun(trained, tmp_path, capsys):
  """Case 2: a run killed after its checkpoint and results.json but before its completion
  marker is not done; the rerun resumes it (no round retrained) before its dependent runs."""
  corpus, _ = trained
  from fedprune_jax import suite

  runs = tmp_path / "runs"
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      _KILLED_SUITE,
      str(corpus),
      str(runs),
      str(pathlib.Path(__file__).parent),
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "FEDPRUNE_TEST_KILL_AT": "before_marker"},
    check=False,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  a_key, b_key = (s.key for s in suite.expand(kill_experiment(str(corpus))))
  a = runs / "runs" / a_key
  assert (a / "checkpoint").is_dir() and (a / "results.json").exists()
  assert workdir_lib.incomplete(a) == f"no completion marker {workdir_lib.MARKER}"
  killed = json.loads((a / "results.json").read_text())["train"]["params_sha256"]
  index = suite.run_experiment(kill_experiment(str(corpus)), runs, progress=False)
  capsys.readouterr()
  assert [r["state"] for r in index["runs"]] == ["done", "done"], index["runs"]
  assert [r["round"] for r in read_jsonl(a / "metrics.jsonl") if "round" in r] == [0, 1]
  assert json.loads((a / "results.json").read_text())["train"]["params_sha256"] == killed
  b = json.loads((runs / "runs" / b_key / "results.json").read_text())["train"]
  assert b["warm_start"] == str(a / "checkpoint")
  # a finished dependency whose artefact is missing is an error naming the run, not a retrain
  shutil.rmtree(a / "checkpoint")
  spec_b = suite.expand(kill_experiment(str(corpus)))[1]
  with pytest.raises(InputError, match=f"runs/{b_key}.*arm 'a'"):
    suite.check_needs(spec_b, runs)


def test_a_corrupt_suite_record_is_not_fatal(tmp_path):
  """Case 12: a corrupt ``suite.json`` (the suite's record of a run) crashed the suite."""
  from fedprune_jax import suite
  from fedprune_jax import suite_index

  spec = suite.expand(kill_experiment("corpus"))[0]
  workdir = tmp_path / spec.dirname
  workdir.mkdir(parents=True)
  (workdir / "suite.json").write_text("{trunc")
  entry = suite_index.entry(spec, tmp_path)
  assert entry["state"] == "pending" and entry["seconds"] is None
  suite_index.record_seconds(workdir, 3.0)
  assert json.loads((workdir / "suite.json").read_text()) == {"seconds": 3.0}
