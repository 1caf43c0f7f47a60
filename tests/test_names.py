"""Path names that are not UTF-8 (a folder made by a Korean Windows tool, an odd OUT) work.

Real folders with undecodable bytes in their names are made with bytes paths; a SOURCE or OUT
argument with such bytes is passed to the command in a child process, as a shell would.
Everything is read back with independent readers (pyarrow, json) through the real bytes paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import output_files, summary_of, table_rows

from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult

KOREAN = "배터리"
CP949 = KOREAN.encode("cp949")  # b"\xb9\xe8\xc5\xcd\xb8\xae": not UTF-8
NEITHER = b"\xff\xfe"  # neither UTF-8 nor CP949


def bytes_dir(parent: Path, name: bytes) -> Path:
    """A new folder `name` (raw bytes) in `parent`, as the str path Python gives for it."""
    path = os.fsencode(parent) + b"/" + name
    os.mkdir(path)
    return Path(os.fsdecode(path))


def copy_dataset(dataset: SynthResult, folder: Path) -> Path:
    shutil.copytree(dataset.root, folder / dataset.root.name)
    return folder


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().out


def run_child(*args: str | bytes | Path) -> subprocess.CompletedProcess:
    """`python -m shardify ARGS` with a UTF-8 locale (stdout strict, as on most systems)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    env["LC_ALL"] = "C.UTF-8"
    return subprocess.run([sys.executable, "-m", "shardify", *map(os.fsencode, args)],
                          capture_output=True, env=env, timeout=120)


def published(out: Path) -> dict[str, bytes]:
    """Shards, manifest and rejects: what must not depend on the folders' name bytes."""
    return output_files(out, "manifest.parquet", "rejects.parquet")


def test_cp949_folder_under_source_shows_its_korean_reading(
        dataset: SynthResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    utf8_source = copy_dataset(dataset, tmp_path / "utf8" / KOREAN).parent
    cp949_source = copy_dataset(dataset, bytes_dir(bytes_dir(tmp_path, b"src"), CP949)).parent
    utf8_out, cp949_out = tmp_path / "utf8-out", tmp_path / "cp949-out"
    assert run(capsys, "convert", utf8_source, "--out", utf8_out, "--quiet")[0] == 0
    code, said = run(capsys, "convert", cp949_source, "--out", cp949_out, "--quiet")
    assert code == 0, said
    # The CP949 folder reads as the Korean name it stands for: the same bytes out.
    assert published(cp949_out) == published(utf8_out)
    rows = table_rows(cp949_out / "manifest.parquet")
    assert len(rows) == dataset.samples
    assert {row["source_archive"].split("/", 1)[0] for row in rows} == {KOREAN}
    assert {row["label_archive"].split("/", 1)[0] for row in rows} == {KOREAN}
    archives = summary_of(cp949_out)["archives"]
    assert archives and all(a["name"].startswith(f"{KOREAN}/") for a in archives)

    code, said = run(capsys, "verify", cp949_out, "--sources", cp949_source)
    assert code == 0 and said.startswith("verify: OK"), said
    code, said = run(capsys, "scan", cp949_source, "--json")
    assert code == 0
    assert [a["name"] for a in json.loads(said)["archives"]] == [a["name"] for a in archives]


def test_non_utf8_source_argument(dataset: SynthResult, tmp_path: Path) -> None:
    source = copy_dataset(dataset, bytes_dir(tmp_path, CP949))
    out = tmp_path / "out"
    child = run_child("convert", source, "--out", out, "--quiet")
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    assert summary_of(out)["options"]["sources"] == [f"{tmp_path}/{KOREAN}"]
    assert len(table_rows(out / "manifest.parquet")) == dataset.samples
    child = run_child("verify", out, "--sources", source)
    assert child.returncode == 0 and child.stdout.startswith(b"verify: OK"), child.stderr


def test_non_utf8_out_folder(dataset: SynthResult, tmp_path: Path) -> None:
    out = bytes_dir(tmp_path, CP949) / "out"
    child = run_child("convert", dataset.root, "--out", out, "--quiet")
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    assert f"samples to {tmp_path}/{KOREAN}/out in ".encode() in child.stdout
    assert len(table_rows(out / "manifest.parquet")) == dataset.samples
    assert summary_of(out)["samples"] == dataset.samples

    child = run_child("verify", out)
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    assert child.stdout.startswith(f"verify: OK: {dataset.samples} samples in {tmp_path}/"
                                   f"{KOREAN}/out ".encode())
    child = run_child("report", out, "--html", out / "report.html")
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    assert f"HTML report written to {tmp_path}/{KOREAN}/out/report.html".encode() \
        in child.stdout
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"shardify report: {tmp_path}/{KOREAN}/out" in page


def test_names_neither_utf8_nor_cp949_are_escaped(
        dataset: SynthResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = copy_dataset(dataset, bytes_dir(bytes_dir(tmp_path, b"src"), NEITHER)).parent
    out = tmp_path / "out"
    code, said = run(capsys, "convert", source, "--out", out, "--quiet")
    assert code == 0, said
    rows = table_rows(out / "manifest.parquet")
    assert len(rows) == dataset.samples
    assert {row["source_archive"].split("/", 1)[0] for row in rows} == {r"\xff\xfe"}
    code, said = run(capsys, "verify", out, "--sources", source)
    assert code == 0 and said.startswith("verify: OK"), said


def test_cp949_and_utf8_folders_of_one_name_both_count(
        dataset: SynthResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two folders that read the same (UTF-8 and CP949 bytes of one Korean name) are two."""
    source = tmp_path / "src"
    copy_dataset(dataset, source / KOREAN)
    copy_dataset(dataset, bytes_dir(source, CP949))
    once = tmp_path / "once"
    assert run(capsys, "convert", source / KOREAN, "--out", once, "--quiet")[0] == 0
    out = tmp_path / "out"
    assert run(capsys, "convert", source, "--out", out, "--quiet")[0] == 0
    names = [a["name"] for a in summary_of(out)["archives"]]
    escaped = CP949.decode("utf-8", "backslashreplace")
    once_names = [a["name"] for a in summary_of(once)["archives"]]
    assert sorted(names) == sorted([f"{KOREAN}/{name}" for name in once_names]
                                   + [f"{escaped}/{name}" for name in once_names])


def test_messages_show_non_utf8_paths_by_their_reading(tmp_path: Path) -> None:
    taken = bytes_dir(tmp_path, CP949)
    (taken / "notes.txt").write_text("not shardify's")
    child = run_child("convert", tmp_path / "src", "--out", taken)
    assert child.returncode == 2
    assert child.stderr.decode() == (f"shardify: error: --out {tmp_path}/{KOREAN} is not empty "
                                     "and is not a shardify output; choose a new or empty "
                                     "folder\n")
    child = run_child("synth", taken / "notes.txt" / "dest")  # an OSError: not a folder
    assert child.returncode == 1
    assert child.stderr.decode().startswith(
        f"shardify: error: [Errno 20] Not a directory: '{tmp_path}/{KOREAN}/notes.txt/dest")


def test_non_utf8_names_inside_download_tar(
        dataset: SynthResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tar_path = tmp_path / "download.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:  # names as raw bytes
        for zip_path in sorted(dataset.root.rglob("*.zip")):
            name = f"{os.fsdecode(CP949)}/{zip_path.relative_to(dataset.root).as_posix()}"
            tar.add(zip_path, name)
    out = tmp_path / "out"
    code, said = run(capsys, "convert", tar_path, "--out", out, "--quiet")
    assert code == 0, said
    rows = table_rows(out / "manifest.parquet")
    assert len(rows) == dataset.samples
    assert {row["source_archive"].split("/", 1)[0] for row in rows} == {KOREAN}
