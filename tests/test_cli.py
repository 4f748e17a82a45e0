"""The command line: verbs, `validate` tables, user errors, and no framework import.

    .venv/bin/python -m pytest tests/test_cli.py -q

Framework-freedom is checked in fresh interpreters: this test process may have imported one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.errors import EXIT_USER_ERROR
from harness.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "specs" / "paper.yaml"
VERBS = ("validate", "run", "parity", "report", "compare", "list", "make-data")
FRAMEWORKS = ("tensorflow", "keras", "torch", "torchvision", "jax")


def _env() -> dict[str, str]:
    # without MURA_ROOT the paper's data section says "not available": fast and the same anywhere
    return {k: v for k, v in os.environ.items() if k != "MURA_ROOT"}


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Help


def test_help_lists_every_verb() -> None:
    proc = harness("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m harness")
    listed = re.findall(r"^    ([a-z][a-z\-]*)\s{2,}\S", proc.stdout, re.M)  # verb + its help
    assert tuple(listed) == VERBS


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m harness {verb}")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from harness import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"harness {__version__}"


def test_no_verb_or_unknown_verb_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["train"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == EXIT_USER_ERROR
        assert "usage: python -m harness" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# validate


@pytest.fixture(scope="module")
def paper_validate() -> subprocess.CompletedProcess[str]:
    return harness("validate", "specs/paper.yaml")


def test_validate_paper(paper_validate: subprocess.CompletedProcess[str]) -> None:
    proc = paper_validate
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert out.startswith("specs/paper.yaml: spec 'paper' is valid: 3 models, seeds [0, 1, 2]")
    totals = re.findall(r"^Total params: ([\d,]+)  Trainable: ([\d,]+)  Non-trainable: ([\d,]+)$",
                        out, re.M)
    assert totals == [("0", "0", "0"), ("3,309,921", "3,309,441", "480"),
                      ("12,644,545", "1,665", "12,642,880")]
    assert "MISMATCH" not in out


def test_validate_prints_keras_like_rows(paper_validate: subprocess.CompletedProcess[str]) -> None:
    lines = paper_validate.stdout.splitlines()

    def row(name: str) -> list[str]:
        hits = [line for line in lines if line.startswith(name + " ")]
        assert hits, name
        return re.split(r"\s{2,}", hits[0].strip())

    assert row("input") == ["input", "(None, 224, 224, 3)", "0"]
    assert row("conv2d_1") == ["conv2d_1 (Conv2D)", "(None, 224, 224, 16)", "448"]
    assert row("maxpool2d_4") == ["maxpool2d_4 (MaxPooling2D)", "(None, 14, 14, 128)", "0"]
    assert row("flatten_1") == ["flatten_1 (Flatten)", "(None, 25088)", "0"]
    assert row("densenet169") == ["densenet169 (Functional)", "(None, 7, 7, 1664)", "12,642,880"]
    checks = [re.split(r"\s{2,}", line.strip()) for line in lines
              if line.startswith(("total ", "trainable ", "non-trainable "))]
    assert checks[:3] == [["total", "3,309,921", "3,309,921", "0", "ok"],
                          ["trainable", "3,309,441", "3,309,441", "0", "ok"],
                          ["non-trainable", "480", "480", "0", "ok"]]
    assert len(checks) == 6 and all(c[-1] == "ok" for c in checks)


def test_validate_prints_data_and_plan(paper_validate: subprocess.CompletedProcess[str]) -> None:
    out = paper_validate.stdout
    assert re.search(r"^Run plan: 15 runs \(\d+ done\) -> results/paper$", out, re.M)
    assert re.search(r"^Data", out, re.M)
    assert re.search(r"^Assumptions: 13 ", out, re.M)


_NO_FRAMEWORK = f"""
import sys
from harness import cli
try:
    code = cli.main(["validate", "specs/paper.yaml"])
except SystemExit as e:
    code = e.code
print("EXIT", code)
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r}))
"""


def test_validate_imports_no_framework() -> None:
    proc = python(_NO_FRAMEWORK)
    assert proc.returncode == 0, proc.stderr
    tail = proc.stdout.splitlines()[-2:]
    assert tail == ["EXIT 0", "LOADED []"], proc.stdout[-2000:]
    assert "Total params: 3,309,921" in proc.stdout


def test_importing_the_core_imports_no_framework() -> None:
    proc = python(
        "import sys\n"
        "import harness, harness.cli, harness.spec, harness.shapes, harness.plan, harness.runner,"
        " harness.results, harness.worker, harness.records, harness.pipeline, harness.validate\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_printed_count_mismatch(tmp_path: Path) -> None:
    data = yaml.safe_load(PAPER.read_text(encoding="utf-8"))
    data["models"][1]["printed_params"] = {"total": 3_309_922, "trainable": 3_309_442,
                                           "non_trainable": 480}
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    proc = harness("validate", str(path))
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr
    table = [re.split(r"\s{2,}", line.strip()) for line in proc.stdout.splitlines()
             if line.startswith(("total ", "trainable ", "non-trainable "))]
    assert table[:3] == [["total", "3,309,922", "3,309,921", "-1", "MISMATCH"],
                         ["trainable", "3,309,442", "3,309,441", "-1", "MISMATCH"],
                         ["non-trainable", "480", "480", "0", "ok"]]
    assert proc.stderr.splitlines() == [
        f"error: {path}: models[1].printed_params.total: the paper prints 3,309,922; the spec's "
        "layers give 3,309,921 (-1) (and 1 more)",
        "  hint: fix the layers, the printed_params or your --set options; the table above shows "
        "every count",
    ]
    assert "Run plan" not in proc.stdout  # stops before the plan


def test_run_refuses_a_count_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    code = main(["run", str(PAPER), "--set", "models.cnn.printed_params.total=3309922",
                 "--set", "models.cnn.printed_params.trainable=3309442", "--out", str(out)])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "models[1].printed_params.total: the paper prints " \
        "3,309,922; the spec's layers give 3,309,921 (-1)" in err
    assert not out.exists()  # nothing trained, nothing written


def test_validate_user_error_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(PAPER), "--set", "models.cnn.train.optimizer.name=adagrad"])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: ") and err[0].endswith(
        "specs/paper.yaml: models[1].train.optimizer: unknown optimizer 'adagrad'; allowed: adam, "
        "adamw, rmsprop, sgd (from --set models.cnn.train.optimizer.name=adagrad)")


# ---------------------------------------------------------------------------------------------
# list, report, make-data


def test_list_prints_backends_and_vocabulary(capsys: pytest.CaptureFixture[str]) -> None:
    from backends.registry import REGISTRY

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Backends:"
    assert lines[1].split() == ["backend", "what", "installed"]
    names = [line.split()[0] for line in lines[3:3 + len(REGISTRY)]]
    assert names == list(REGISTRY)
    assert {"reference", "keras", "torch"} <= set(names)
    # the support matrix and the shared vocabulary: tests/test_vocab.py
    assert "What each backend supports (yes; -: not supported; ?: not declared):" in lines
    assert "Metrics: accuracy, recall, precision, specificity, f1, auroc, kappa" in lines


def test_list_with_a_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "specs/paper.yaml" if Path.cwd() == ROOT else str(PAPER)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines()[3:6]]
    assert rows == [["baseline", "random"], ["cnn", "sequential"], ["densenet", "pretrained"]]


def test_list_with_a_bad_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", str(tmp_path / "nope.yaml")]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.splitlines()[0] == \
        f"error: {tmp_path / 'nope.yaml'}: spec file not found"


def test_report_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path}: no runs/ folder here",
        "  hint: pass a results folder written by `python -m harness run`, e.g. results/demo",
    ]


def test_make_data_rejects_an_unknown_body_part(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-data", str(tmp_path / "d"), "--body-parts", "KNEE"]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.splitlines() == [
        "error: --body-parts: unknown part 'KNEE'; allowed: ELBOW, FINGER, FOREARM, HAND, "
        "HUMERUS, SHOULDER, WRIST"]
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("name", ["paper-patient-split", "demo-patient-split"])
def test_patient_split_variants_validate(name: str) -> None:
    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    assert spec.name == name
    assert (spec.data.split.strategy, spec.data.split.stratify) == ("patient", True)
    assert [m.name for m in spec.models] == ["baseline", "cnn", "densenet"]


# ---------------------------------------------------------------------------------------------
# Bad input, refused before anything starts (issue 13)


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0].removeprefix("error: ")


@pytest.mark.parametrize(("option", "text"), [
    ("--models", ""), ("--models", ","), ("--backends", ","), ("--backends", " "),
    ("--seeds", ""), ("--seeds", ",,"),
])
def test_an_empty_selection_is_refused(option: str, text: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    for verb in ("validate", "run"):
        assert main([verb, str(PAPER), option, text, "--out", str(out)]) == EXIT_USER_ERROR
        assert _one_error(capsys) == (
            f"{option}: empty list (got {text!r}); name at least one, comma-separated, "
            f"or leave {option} out to select all")
    assert not out.exists()


def test_an_empty_item_or_a_bad_seed_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(PAPER), "--models", "cnn,"]) == EXIT_USER_ERROR
    assert _one_error(capsys) == \
        "--models: empty item in 'cnn,'; write names separated by single commas"
    assert main(["validate", str(PAPER), "--seeds", "0,-1"]) == EXIT_USER_ERROR
    assert _one_error(capsys) == \
        "--seeds: '-1' is not a seed; seeds are integers in [0, 4294967295]"


def test_a_selection_matching_no_run_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    code = main(["run", str(PAPER), "--models", "baseline", "--backends", "torch",
                 "--out", str(out)])
    assert code == EXIT_USER_ERROR
    assert _one_error(capsys).endswith(
        "specs/paper.yaml: --models baseline --backends torch: the selection matches no run; "
        "baseline runs on reference; cnn runs on keras, torch; densenet runs on keras, torch")
    assert not out.exists()


_SMALL_TREE = ("--patients", "6", "--min-size", "32", "--max-size", "64")


def test_make_data_never_overwrites_a_mura_tree(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-data", str(tmp_path), *_SMALL_TREE]) == 0
    capsys.readouterr()
    csvs = {p: p.read_bytes() for p in (tmp_path / "MURA-v1.1").glob("*.csv")}
    assert len(csvs) == 4
    (tmp_path / "MURA-v1.1" / "train_labeled_studies.csv").write_text("MURA's own labels\n")
    assert main(["make-data", str(tmp_path), *_SMALL_TREE, "--seed", "1"]) == EXIT_USER_ERROR
    assert _one_error(capsys) == (
        f"{tmp_path / 'MURA-v1.1'}: already exists; make-data never overwrites a MURA tree "
        "(its CSVs are the labels): name another folder, or remove this one first")
    assert (tmp_path / "MURA-v1.1" / "train_labeled_studies.csv").read_text() == \
        "MURA's own labels\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MURA-v1.1"]  # no temp folder left


def test_make_data_refuses_an_empty_mura_folder_too(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "MURA-v1.1").mkdir()
    assert main(["make-data", str(tmp_path), *_SMALL_TREE]) == EXIT_USER_ERROR
    assert _one_error(capsys).startswith(f"{tmp_path / 'MURA-v1.1'}: already exists; ")
    assert list((tmp_path / "MURA-v1.1").iterdir()) == []


def test_make_data_onto_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "f"
    file.write_text("keep me")
    assert main(["make-data", str(file), *_SMALL_TREE]) == EXIT_USER_ERROR
    assert _one_error(capsys) == f"{file}: is a file, not a folder; name a new or empty folder"
    assert main(["make-data", str(file / "sub"), *_SMALL_TREE]) == EXIT_USER_ERROR
    assert _one_error(capsys) == \
        f"{file / 'sub'}: cannot create the folder (Not a directory); name a writable folder"
    assert file.read_text() == "keep me"


def test_evaluation_settings_are_checked_before_any_run(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    for verb in ("validate", "run"):
        code = main([verb, str(PAPER), "--set", "evaluation.bootstrap.seed=-5", "--out", str(out)])
        assert code == EXIT_USER_ERROR
        assert _one_error(capsys).endswith(
            "specs/paper.yaml: evaluation.bootstrap.seed: must be an integer seed in "
            "[0, 4294967295]; got -5 (from --set evaluation.bootstrap.seed=-5)")
    assert not out.exists()


@pytest.mark.parametrize(("out", "what"), [
    ("/", "the root folder"),
    ("/proc/sys", "a system folder"),
    ("/usr/share/results", "a system folder"),
    ("{tmp}/f", "a file, not a folder"),
    ("{tmp}/f/sub", "under {tmp}/f, which is a file"),
])
def test_a_results_folder_that_must_not_be_written(out: str, what: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("keep me")
    out, what = out.format(tmp=tmp_path), what.format(tmp=tmp_path)
    for verb in (["validate"], ["run"], ["run", "--dry-run"]):
        assert main([*verb, str(PAPER), "--out", out]) == EXIT_USER_ERROR
        assert _one_error(capsys) == (
            f"--out: {out} is {what}; name a folder of your own for the results "
            "(default: results/<spec name>)")
    assert (tmp_path / "f").read_text() == "keep me"


def test_an_unwritable_results_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import harness.results

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    # as for a folder without write permission (tests may run as root, who may write anywhere)
    monkeypatch.setattr(harness.results.os, "access",
                        lambda p, mode: Path(p) != locked and real(p, mode))
    for out in (locked, locked / "results"):
        assert main(["run", str(PAPER), "--out", str(out)]) == EXIT_USER_ERROR
        what = ("not writable by this user" if out == locked
                else f"under {locked}, which this user cannot write")
        assert _one_error(capsys) == (
            f"--out: {out} is {what}; name a folder of your own for the results "
            "(default: results/<spec name>)")
    assert list(locked.iterdir()) == []


def test_validate_refuses_a_configured_but_broken_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["make-data", str(tmp_path), *_SMALL_TREE]) == 0
    images = sorted((tmp_path / "MURA-v1.1" / "train").rglob("*.png"))
    for png in images[:4]:
        png.unlink()
    capsys.readouterr()
    monkeypatch.setenv("MURA_ROOT", str(tmp_path))
    assert main(["validate", str(PAPER)]) == EXIT_USER_ERROR
    gone = ", ".join(str(p.relative_to(tmp_path)) for p in images[:3])
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'MURA-v1.1'}: 4 image file(s) listed in the CSVs are missing "
        f"(first: {gone}); restore the files or re-extract the archive"]
    monkeypatch.setenv("MURA_ROOT", str(tmp_path / "nope"))
    assert main(["validate", str(PAPER)]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.splitlines()[0] == \
        f"error: MURA_ROOT: {tmp_path / 'nope'} does not exist or is not a folder"
    monkeypatch.delenv("MURA_ROOT")  # an unconfigured root is "not checked here"
    assert main(["validate", str(PAPER)]) == 0
    assert "Data: not available here: " in capsys.readouterr().out
