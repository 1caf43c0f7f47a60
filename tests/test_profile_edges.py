"""User profiles at their edges: list columns given as lists, a profile failing on some labels
(its own exceptions, classes beyond its names, values its columns cannot hold), profiles that
cannot be loaded, sibling imports, `--crop` without an outline, and a consuming run resumed
with its profile file moved. Read back with tarfile, zipfile and pyarrow."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import converted_copy, manifest_rows, read_shards, reject_rows
from PIL import Image

from shardify.cli import main

EDGES = '''
from typing import NamedTuple

import numpy as np

from shardify.profiles.base import Column, JsonProfile, required


class Fields(NamedTuple):
    group: str
    label: int
    tags: list
    ids: list
    count: int
    flag: bool
    width: int | None
    height: int | None


class Edges(JsonProfile):
    name = "edges"
    extra_columns = (Column("tags", "list<string>", "tags"), Column("ids", "list<int64>", "ids"),
                     Column("count", "int64", "count"), Column("flag", "bool", "flag"))

    @property
    def class_names(self):
        return ("even", "odd")

    def fields(self, label):
        mode, n = required(label, "mode"), label["n"]
        group, cls, count, flag = f"g{n % 4}", n % 2, n, n % 3 == 0
        if mode == "keyerror":
            label["nope"]
        elif mode == "class":
            cls = 7
        elif mode == "group":
            group = n
        elif mode == "type":
            count = "three"
        elif mode == "flag":
            flag = "yes"
        elif mode == "numpy":
            cls, count, flag = np.int64(n % 2), np.int64(n), np.bool_(flag)
        elif mode == "float":
            count = float(n)
        elif mode == "fraction":
            count = n + 0.5
        return Fields(group, cls, [mode, "x"], [n, -n], count, flag, 32, 24)


PROFILE = Edges()
'''

FAILS = {
    "keyerror": "profile edges failed on this label: KeyError: 'nope'",
    "class": "profile edges gave class 7, not a number from 0 to 1 (it names 2 classes)",
    "group": "profile edges gave a group that is not non-empty text: 5",
    "type": "profile edges gave count 'three', which its int64 column cannot hold",
    "flag": "profile edges gave flag 'yes', which its bool column cannot hold",
    "fraction": "profile edges gave count 13.5, which its int64 column cannot hold",
}
MODES = {1: "keyerror", 3: "class", 5: "group", 7: "type", 9: "flag", 10: "numpy", 11: "numpy",
         12: "float", 13: "fraction"}
SAMPLES = 24


def write_download(folder: Path, samples: int = SAMPLES, per_zip: int = SAMPLES) -> None:
    """Zips of `per_zip` 32x24 JPEGs, each with its label beside it; label n has MODES[n]."""
    folder.mkdir(parents=True)
    for first in range(0, samples, per_zip):
        with zipfile.ZipFile(folder / f"part{first:03d}.zip", "w") as archive:
            for n in range(first, min(first + per_zip, samples)):
                buffer = io.BytesIO()
                Image.new("RGB", (32, 24), (n * 10 % 256, 80, 160)).save(buffer, "JPEG")
                archive.writestr(f"img/s{n:03d}.jpg", buffer.getvalue())
                archive.writestr(f"lbl/s{n:03d}.json",
                                 json.dumps({"n": n, "mode": MODES.get(n, "ok")}))


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The edge profile's file and its conversion of the 24 samples."""
    root = tmp_path_factory.mktemp("edges")
    profile = root / "edges profile 한글.py"
    profile.write_text(EDGES)
    write_download(root / "src")
    return profile, converted_copy(root / "src", tmp_path_factory, "edges-out",
                                   "--profile", str(profile))


def test_lists_and_numpy_values_are_written(edges: tuple[Path, Path]) -> None:
    _, out = edges
    rows = {row["key"]: row for row in manifest_rows(out)}
    good = [n for n in range(SAMPLES) if MODES.get(n, "ok") not in FAILS]
    assert sorted(rows) == [f"s{n:03d}" for n in good]
    for n in good:
        row = rows[f"s{n:03d}"]
        assert (row["group"], row["label"], row["count"], row["flag"]) == \
            (f"g{n % 4}", n % 2, n, n % 3 == 0)
        assert row["tags"] == [MODES.get(n, "ok"), "x"] and row["ids"] == [n, -n]
    shards = read_shards(out)
    assert {key: int(sample["cls"]) for key, sample in shards.items()} == \
        {key: row["label"] for key, row in rows.items()}
    assert all(json.loads(shards[key]["json"])["n"] == int(key[1:]) for key in shards)


def test_a_profile_failing_on_a_label_makes_it_a_reject(edges: tuple[Path, Path],
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """Each failure is the label's bad-label reject (image and label), with the reason."""
    _, out = edges
    found = {(row["key"], row["source_member"]): (row["reason"], row["detail"])
             for row in reject_rows(out)}
    expected = {(f"s{n:03d}", f"{folder}/s{n:03d}.{ext}"): ("bad-label", FAILS[mode])
                for n, mode in MODES.items() if mode in FAILS
                for folder, ext in (("img", "jpg"), ("lbl", "json"))}
    assert found == expected
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize(("text", "says"), [
    ("from shardify.profiles.base import JsonProfile\nclass P(JsonProfile):\n    name = 'p'\n"
     "PROFILE = P\n", "PROFILE is the class P, not an object: PROFILE = P()"),
    ("from shardify.profiles.base import JsonProfile\nclass P(JsonProfile):\n    name = 'p'\n"
     "    class_names = ()\nPROFILE = P()\n", "class_names must be distinct, non-empty texts"),
    ("from shardify.profiles.base import JsonProfile\nclass P(JsonProfile):\n    name = 'p'\n"
     "    class_names = ('a', 'a')\nPROFILE = P()\n", "not ('a', 'a')"),
    ("from shardify.profiles.base import Column, JsonProfile\nclass P(JsonProfile):\n"
     "    name = 'p'\n    class_names = ('a',)\n    extra_columns = (Column('scale', 'int64', "
     "''), Column('n', 'int64', ''), Column('n', 'string', ''))\nPROFILE = P()\n",
     "its columns n repeat a name"),
    ("from shardify.profiles.base import Column, JsonProfile\nclass P(JsonProfile):\n"
     "    name = 'p'\n    class_names = ('a',)\n    extra_columns = (Column('scale', 'int64', "
     "''), Column('split', 'string', ''))\nPROFILE = P()\n",
     "its columns scale, split take names of the manifest's own columns"),
    ("from shardify.profiles.base import Column, JsonProfile\nclass P(JsonProfile):\n"
     "    name = 'p'\n    class_names = ('a',)\n    extra_columns = (Column('n', 'int32', ''),)"
     "\nPROFILE = P()\n", "its columns cannot be had: ValueError: column type 'int32'"),
    ("import sys\nsys.exit(3)\n", "cannot be loaded: SystemExit: 3"),
    ("from shardify.profiles.base import JsonProfile\nclass P(JsonProfile):\n    name = 'p'\n"
     "    class_names = ('ok', 'shards')\nPROFILE = P()\n", "shards cannot name a class"),
    ("from shardify.profiles.base import JsonProfile\nclass P(JsonProfile):\n    name = 'p'\n"
     "    group_unit = 'trees'\n    class_names = ('trees', 'x')\nPROFILE = P()\n",
     "trees cannot name a class or the groups"),
])
def test_a_profile_that_cannot_work_is_one_line(tmp_path: Path, text: str, says: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "wrong.py"
    path.write_text(text)
    for command in (["scan", str(tmp_path)], ["convert", str(tmp_path), "--out",
                                              str(tmp_path / "out")]):
        assert main([*command, "--profile", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def test_more_classes_than_the_label_column_holds_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The label column is int16: 40000 categories would overflow it."""
    assert main(["scan", str(tmp_path), "--profile", "bees-71667", "-P",
                 "categories=40000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least one, at most 32768" in err, err[:300]


def test_options_a_profile_cannot_take_are_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A user's own __init__ that with_options cannot call."""
    path = tmp_path / "init.py"
    path.write_text("from shardify.profiles import ProfileOption\n"
                    "from shardify.profiles.base import JsonProfile\nclass P(JsonProfile):\n"
                    "    name = 'p'\n    class_names = ('a',)\n"
                    "    options = {'x': ProfileOption('1', 'x')}\n"
                    "    def __init__(self):\n        super().__init__()\nPROFILE = P()\n")
    assert main(["scan", str(tmp_path), "--profile", str(path), "-P", "x=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its options cannot be set: TypeError" in err, err


def test_a_profile_imports_modules_beside_it(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "my profiles"
    folder.mkdir()
    (folder / "edge_names_for_test.py").write_text("NAMES = ('even', 'odd')\n")
    (folder / "sibling.py").write_text(EDGES.replace(
        'return ("even", "odd")', "from edge_names_for_test import NAMES\n        return NAMES"))
    assert main(["profiles", "--profile", str(folder / "sibling.py")]) == 0
    assert "edges (version 1)" in capsys.readouterr().out


def test_crop_outline_needs_an_outline(tmp_path: Path, edges: tuple[Path, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    profile, _ = edges
    (tmp_path / "src").mkdir()
    for spec in ("bees-71667", str(profile)):
        assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                     "--profile", spec, "--crop", "outline"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "declares no outline to crop to" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_consuming_run_needs_its_profile_file_where_it_was(tmp_path: Path) -> None:
    """The saved plan holds the profile's fields: with the file moved, a fresh process says
    so (not "plan damaged, cannot be finished"); moved back, the run finishes."""
    profile = tmp_path / "a" / "edges.py"
    profile.parent.mkdir()
    profile.write_text(EDGES)
    write_download(tmp_path / "src", per_zip=6)
    command = [sys.executable, "-m", "shardify", "convert", str(tmp_path / "src"), "--out",
               str(tmp_path / "out"), "--consume-sources", "--yes", "--quiet", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([*command, "--profile", str(profile)], env=env, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stderr
    consumed = json.loads((tmp_path / "out" / "consumed.json").read_text())
    assert consumed["released"] == [  # the zips without a reject
        f"part{first:03d}.zip" for first in range(0, SAMPLES, 6)
        if not any(MODES.get(n) in FAILS for n in range(first, first + 6))]
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == sorted(consumed["kept"])
    shutil.move(tmp_path / "a", tmp_path / "b")
    run = subprocess.run([*command, "--profile", str(tmp_path / "b" / "edges.py")], env=env,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2
    assert "its saved plan holds labels read by a profile file that is not loaded now" in \
        run.stderr and "Traceback" not in run.stderr and "damaged" not in run.stderr
    shutil.move(tmp_path / "b", tmp_path / "a")
    run = subprocess.run([*command, "--profile", str(profile)], env=env, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert len(manifest_rows(tmp_path / "out")) == SAMPLES - len(FAILS)


@pytest.mark.slow
def test_verify_says_a_profile_failing_after_the_conversion(tmp_path: Path) -> None:
    """The file rewritten in place (same name and version) to fail on every label: verify, in
    a fresh process, lists each sample as a problem, on one line each, no traceback."""
    profile = tmp_path / "edges.py"
    profile.write_text(EDGES)
    write_download(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet",
                 "--profile", str(profile)]) == 0
    profile.write_text(EDGES.replace('mode, n = required(label, "mode"), label["n"]',
                                     'mode, n = required(label, "mode"), label["m"]'))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "shardify", "verify", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    problems = [line for line in run.stdout.splitlines()
                if "profile edges failed on this label: KeyError: 'm'" in line]
    assert len(problems) == len(pq.read_table(tmp_path / "out" / "manifest.parquet"))


def test_synth_names_the_planted_rejects(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    assert main(["synth", str(tmp_path), "--profile", "thermal-514"]) == 0
    out = capsys.readouterr().out
    assert "planted rejects {'bad-image': 2, 'bad-label': 4, 'orphan-image': 1, " \
        "'orphan-label': 1}" in out, out


def test_a_copy_of_a_built_in_profile_loads_with_its_imports_written_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the README says to do with profiles/thermal.py for a copy with other paths."""
    import shardify.profiles.thermal as thermal

    text = Path(thermal.__file__).read_text()
    for relative, absolute in (("from ..errors", "from shardify.errors"),
                               ("from . import", "from shardify.profiles import"),
                               ("from .base", "from shardify.profiles.base"),
                               ("from .samples", "from shardify.profiles.samples")):
        assert relative in text
        text = text.replace(relative, absolute)
    (tmp_path / "mine.py").write_text(text.replace('name = "thermal-514"', 'name = "mine"'))
    assert main(["profiles", "--profile", str(tmp_path / "mine.py")]) == 0
    assert "mine (version 1)" in capsys.readouterr().out
