"""The built-in bees-71667 and thermal-514 profiles, a user's profile written from the README,
and the one-line errors of a wrong profile: each read back with tarfile, zipfile, pyarrow, PIL."""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import manifest_rows, reject_rows, summary_of
from PIL import Image

from shardify.cli import main
from shardify.profiles import Geometry
from shardify.profiles.load import BUILT_IN, get_profile
from shardify.profiles.samples import SampleDownload
from shardify.transform.geometry import Box, Placement, map_label

README = Path(__file__).resolve().parents[1] / "README.md"
FILL = {"bees-71667": (250, 200, 40), "thermal-514": (255, 230, 120)}  # the boxes' paint


def sources(root: Path) -> dict[str, tuple[zipfile.ZipFile, zipfile.ZipInfo]]:
    """Every member of the sample download's zips by base name (CP949 names decoded)."""
    found = {}
    for path in sorted(root.rglob("*.zip")):
        archive = zipfile.ZipFile(path, metadata_encoding="cp949")
        for info in archive.infolist():
            found[info.filename.rsplit("/", 1)[-1]] = (archive, info)
    return found


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of every sample in OUT's shards, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(out.glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                handle = tar.extractfile(member)
                assert handle is not None
                samples[key][ext] = handle.read()
    return samples


def class_names(out: Path) -> list[str]:
    return json.loads(pq.read_schema(out / "manifest.parquet").metadata[b"class_names"])


@pytest.fixture(scope="module", params=["bees-71667", "thermal-514"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[str, SampleDownload, Path]:
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    data = get_profile(name).synthesize(tmp / "src")
    assert isinstance(data, SampleDownload)
    out = tmp / "out"
    assert main(["convert", str(data.root), "--out", str(out), "--profile", name,
                 "--shard-size", "64KiB", "--quiet"]) == 0
    return name, data, out


def test_sample_data_converts_exactly(converted: tuple[str, SampleDownload, Path]) -> None:
    name, data, out = converted
    rows = manifest_rows(out)
    names = class_names(out)
    assert {r["key"]: (r["group"], names[r["label"]]) for r in rows} == data.expected
    assert Counter(r["reason"] for r in reject_rows(out)) == data.rejects
    summary = summary_of(out)
    assert summary["identical_duplicates"] == data.identical_duplicates
    assert summary["ignored_members"] == data.ignored
    assert summary["other_files"] == data.other_files
    assert summary["options"]["profile"] == f"{name} 1"
    splits_of_group = defaultdict(set)
    for row in rows:
        splits_of_group[row["group"]].add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of_group.values())
    assert {s for splits in splits_of_group.values() for s in splits} == {"train", "val", "test"}
    found, written = sources(data.root), shard_samples(out)
    assert set(written) == set(data.expected)
    for row in rows:
        sample = written[row["key"]]
        archive, info = found[row["key"] + ".jpg"]
        assert sample["jpg"] == archive.read(info)
        archive, info = found[row["key"] + ".json"]
        assert sample["json"] == archive.read(info)
        assert int(sample["cls"]) == row["label"]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (row["width"], row["height"])


def test_verify_and_report_need_no_profile(converted: tuple[str, SampleDownload, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    name, data, out = converted
    assert main(["verify", str(out)]) == 0
    assert f"{data.samples} samples" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{get_profile(name).group_unit} having each class" in text


def test_columns_hold_the_label_fields(converted: tuple[str, SampleDownload, Path]) -> None:
    name, data, out = converted
    found = sources(data.root)
    for row in manifest_rows(out):
        archive, info = found[row["key"] + ".json"]
        label = json.loads(archive.read(info))
        annotations = label["annotations"]
        assert row["boxes"] == len(annotations)
        if name == "bees-71667":
            categories = Counter(a["category_id"] for a in annotations)
            assert row["categories"] == sorted(categories)
            assert row["device"] == label["collection"]["device"]
            assert row["datetime"] == label["collection"]["datetime"]
        else:
            assert row["statuses"] == list(dict.fromkeys(a["attributes"]["status"]
                                                         for a in annotations))
            assert row["equipment_type"] == label["metadata"]["equipment_type"]


def _boxes(name: str, label: dict[str, Any]) -> list[list[float]]:
    """The label's boxes as [x1, y1, x2, y2], read the way the README says each profile has it."""
    if name == "bees-71667":
        return [a["bbox"] for a in label["annotations"]]
    return [[d["x"], d["y"], d["x"] + d["width"], d["y"] + d["height"]]
            for d in (a["data"] for a in label["annotations"])]


@pytest.mark.slow
def test_resize_maps_the_boxes(converted: tuple[str, SampleDownload, Path],
                               tmp_path: Path) -> None:
    """Each written box is the source box scaled, and the box's paint is under it."""
    name, data, _ = converted
    out = tmp_path / "out"
    assert main(["convert", str(data.root), "--out", str(out), "--profile", name,
                 "--resize", "96", "--quiet"]) == 0
    found = sources(data.root)
    checked = 0
    for key, sample in shard_samples(out).items():
        archive, info = found[key + ".json"]
        source, written = json.loads(archive.read(info)), json.loads(sample["json"])
        scale = 96 / max(source["image"]["width"], source["image"]["height"])
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        assert (written["image"]["width"], written["image"]["height"]) == \
            (image.shape[1], image.shape[0])
        for before, after in zip(_boxes(name, source), _boxes(name, written), strict=True):
            assert after == pytest.approx([v * scale for v in before], abs=0.011)
            x, y = int((after[0] + after[2]) / 2), int((after[1] + after[3]) / 2)
            assert np.abs(image[y, x].astype(int) - FILL[name]).max() < 40, (key, after)
            checked += 1
    assert checked >= data.samples


def test_boxes_keep_their_form_when_the_image_turns() -> None:
    """EXIF orientation 3 (a half turn) of a 100x80 image: corners swap, boxes stay ordered."""
    label = {"b": [10, 20, 30, 50], "d": {"x": 10, "y": 20, "width": 20, "height": 30,
                                          "note": "kept"}, "size": {"w": 100, "h": 80}}
    geometry = Geometry(point_lists=(), size=(("size", "w"), ("size", "h")),
                        corner_boxes=(("b",),), xywh_boxes=(("d",),))
    unmapped = map_label(label, geometry, 3, (100, 80), Placement(Box(0, 0, 100, 80), 50, 40))
    assert unmapped == 0
    assert label["b"] == [35.0, 15.0, 45.0, 30.0]  # (70, 30, 90, 60) upright, halved
    assert label["d"] == {"x": 35.0, "y": 15.0, "width": 10.0, "height": 15.0, "note": "kept"}
    assert label["size"] == {"w": 50, "h": 40}
    broken = {"b": [1, 2, 3], "d": {"x": "a"}, "size": {}}
    assert map_label(broken, geometry, 1, (100, 80), Placement(Box(0, 0, 100, 80), 50, 40)) == 2
    assert broken["b"] == [1, 2, 3] and broken["d"] == {"x": "a"}


def test_profiles_lists_every_profile_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles"]) == 0
    text = capsys.readouterr().out
    for name in BUILT_IN:
        profile = get_profile(name)
        assert f"{name} (version {profile.version})" in text
        for key, option in profile.options.items():
            assert f"-P {key}=" in text and f"(default {option.default})" in text




@pytest.mark.parametrize(("text", "says"), [
    ("PROFILE = (\n", "cannot be loaded (line 1): SyntaxError"),
    ("raise RuntimeError('no database')\n", "cannot be loaded: RuntimeError: no database"),
    ("X = 1\n", "defines no PROFILE"),
    ("class P:\n    name = 'p'\nPROFILE = P()\n", "PROFILE lacks version, image_extensions"),
])
def test_a_wrong_profile_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          text: str, says: str) -> None:
    path = tmp_path / "wrong.py"
    path.write_text(text)
    assert main(["scan", str(tmp_path), "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "says"), [
    (["--profile", "cats"], "unknown dataset profile 'cats' (built in: battery, bees-71667"),
    (["--profile", "nowhere.py"], "profile file nowhere.py does not exist"),
    (["-P", "colour=red"], "profile battery has no option 'colour' (its options: group,"),
    (["-P", "group=site"], "group must be one of data_type+battery, battery, not 'site'"),
    (["-P", "group"], "-P takes key=value, not 'group'"),
    (["--profile", "thermal-514", "-P", "categories=3"], "profile thermal-514 has no option"),
])
def test_a_wrong_profile_or_option_is_one_line(tmp_path: Path, args: list[str], says: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["scan", str(tmp_path)], ["convert", str(tmp_path), "--out",
                                              str(tmp_path / "out")]):
        assert main([*command, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def readme_profile(tmp_path: Path) -> Path:
    """The README's example profile, exactly as printed there."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [block for block in blocks if "PROFILE = CrackProfile()" in block]
    path = tmp_path / "cracks_profile.py"
    path.write_text(example)
    return path


def crack_download(folder: Path) -> dict[str, tuple[str, int, list[int]]]:
    """Images in one zip, labels in another, of 5 sites; one label with a verdict the profile
    refuses. Returns key -> (site, class, box) of the samples a conversion must write."""
    folder.mkdir()
    expected = {}
    with zipfile.ZipFile(folder / "images.zip", "w") as images, \
            zipfile.ZipFile(folder / "labels.zip", "w") as labels:
        for number in range(21):
            site, key = f"A{number % 5}", f"crack_{number:03d}"
            box = [4 + number, 6, 30 + number, 40]
            verdict = "maybe" if number == 20 else ("ok", "crack")[number % 3 == 0]
            pixels = np.full((48, 64, 3), 90, np.uint8)
            pixels[box[1]:box[3], box[0]:box[2]] = 240
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG")
            images.writestr(f"img/{key}.jpg", buffer.getvalue())
            labels.writestr(f"lbl/{key}.json", json.dumps(
                {"site": site, "verdict": verdict, "image": {"width": 64, "height": 48},
                 "boxes": [box]}))
            if verdict != "maybe":
                expected[key] = (site, ("ok", "crack").index(verdict), box)
    return expected


@pytest.mark.slow
def test_a_profile_written_from_the_readme_works(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    profile = readme_profile(tmp_path)
    expected = crack_download(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "src"), "--out", str(out), "--profile", str(profile),
                 "--resize", "32", "--quiet"]) == 0
    rows = manifest_rows(out)
    assert {r["key"]: (r["group"], r["label"]) for r in rows} == \
        {key: (site, label) for key, (site, label, _) in expected.items()}
    assert all(r["verdict"] == ("ok", "crack")[r["label"]] for r in rows)
    assert {(r["reason"], r["detail"]) for r in reject_rows(out)} == \
        {("bad-label", "verdict is not ok or crack: 'maybe'")}
    sites = defaultdict(set)
    for row in rows:
        sites[row["group"]].add(row["split"])
    assert all(len(splits) == 1 for splits in sites.values())
    meta = pq.read_schema(out / "manifest.parquet").metadata
    assert json.loads(meta[b"options"])["profile_spec"] == str(profile.absolute())
    assert json.loads(meta[b"class_names"]) == ["ok", "crack"]
    for key, sample in shard_samples(out).items():
        written = json.loads(sample["json"])
        assert written["boxes"] == [[v / 2 for v in expected[key][2]]]  # 64 -> 32: halved
        assert int(sample["cls"]) == expected[key][1]
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    assert "sites having each class" in capsys.readouterr().out
    assert main(["profiles", "--profile", str(profile)]) == 0
    assert "cracks (version 1)" in capsys.readouterr().out
    assert main(["scan", str(tmp_path / "src"), "--profile", str(profile), "-P", "x=1"]) == 2
    assert "profile " + str(profile) + " has no option 'x' (its options: none)" in \
        capsys.readouterr().err


def test_export_without_defect_polygons_writes_no_masks(
        converted: tuple[str, SampleDownload, Path], tmp_path: Path) -> None:
    """Class 0 is normal, every other class abnormal; no all-black masks claiming no defect."""
    _, _, out = converted
    assert main(["export", str(out), str(tmp_path / "dir"), "--quiet"]) == 0
    train = [r for r in manifest_rows(out) if r["split"] == "train"]
    files = {folder.name: sorted(p.stem for p in folder.iterdir())
             for folder in (tmp_path / "dir").iterdir() if folder.is_dir()}
    assert files == {"normal": sorted(r["key"] for r in train if r["label"] == 0),
                     "abnormal": sorted(r["key"] for r in train if r["label"] != 0)}


@pytest.mark.slow
def test_hugging_face_reads_the_profile_classes(
        converted: tuple[str, SampleDownload, Path], hf_cache: str) -> None:
    """datasets loads OUT by its card: the ClassLabel names and every train sample's class."""
    import datasets

    name, _, out = converted
    train = datasets.load_dataset(str(out), split="train", cache_dir=hf_cache)
    assert train.features["cls"].names == list(get_profile(name).class_names)
    assert sorted(zip(train["__key__"], train["cls"], strict=True)) == sorted(
        (r["key"], r["label"]) for r in manifest_rows(out) if r["split"] == "train")


def test_other_profile_options_are_another_conversion(
        converted: tuple[str, SampleDownload, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The options are in the fingerprint: a re-run with others does not mix shards."""
    name, data, _ = converted
    option = {"bees-71667": "categories=a,b,c,d", "thermal-514": "group=location"}[name]
    out = tmp_path / "out"
    command = ["convert", str(data.root), "--out", str(out), "--profile", name, "--quiet"]
    assert main(command) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main([*command, "-P", option]) == 2
    assert "holds shards of another conversion (profile_options" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert main([*command, "-P", option, "--overwrite"]) == 0
    meta = json.loads(pq.read_schema(out / "manifest.parquet").metadata[b"options"])
    key, value = option.split("=")
    assert meta["profile_options"][key] == value
    assert main(["verify", str(out)]) == 0


def test_the_gallery_draws_boxes_as_rectangles() -> None:
    """Both box forms become closed four-corner outlines; a malformed box is not drawn."""
    from shardify.report import POLYGON_COLOUR, label_polygons

    geometry = Geometry(point_lists=(), size=(("w",), ("h",)),
                        corner_boxes=(("a", "*", "bbox"),), xywh_boxes=(("a", "*", "data"),))
    label = {"a": [{"bbox": [1, 2, 5, 7]}, {"data": {"x": 1, "y": 2, "width": 4, "height": 5}},
                   {"bbox": [1, 2, 3]}, {"data": {"x": 1}}]}
    rectangle = [1, 2, 5, 2, 5, 7, 1, 7]
    assert label_polygons(label, geometry) == [(rectangle, POLYGON_COLOUR)] * 2


@pytest.mark.slow
def test_a_moved_profile_file_is_named_again(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """OUT records the profile file's path; after the file moved, verify, report and export
    take --profile naming where it is now, and only the same profile."""
    profile = readme_profile(tmp_path)
    crack_download(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "src"), "--out", str(out), "--profile", str(profile),
                 "--quiet"]) == 0
    moved = tmp_path / "elsewhere" / "profile 한글.py"
    moved.parent.mkdir()
    profile.rename(moved)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert f"profile file {profile.absolute()} does not exist" in capsys.readouterr().out
    assert main(["report", str(out)]) == 2
    assert main(["verify", str(out), "--profile", str(moved)]) == 0
    assert main(["report", str(out), "--profile", str(moved)]) == 0
    assert main(["export", str(out), str(tmp_path / "dir"), "--profile", str(moved),
                 "--quiet"]) == 0
    assert sorted(p.stem for p in (tmp_path / "dir").rglob("*.jpg")) == sorted(
        r["key"] for r in manifest_rows(out) if r["split"] == "train")
    other = tmp_path / "other.py"
    other.write_text(moved.read_text().replace('name = "cracks"', 'name = "holes"'))
    capsys.readouterr()
    assert main(["verify", str(out), "--profile", str(other)]) == 1
    assert "written by profile cracks, not holes" in capsys.readouterr().out


@pytest.mark.parametrize(("statuses", "label"), [
    (["normal", " Normal "], 0), (["정상", "normal"], 0), (["normal", "과열"], 1),
    (["overheat"], 1)])
def test_thermal_status_makes_the_class(statuses: list[str], label: int) -> None:
    document = {"metadata": {"location": "S1", "equipment_id": 7},
                "annotations": [{"attributes": {"status": s}} for s in statuses]}
    fields = get_profile("thermal-514").parse_label(json.dumps(document).encode())
    assert (fields.label, fields.group) == (label, "S1/7")
    assert get_profile("thermal-514", {"group": "location"}).parse_label(
        json.dumps(document).encode()).group == "S1"


FORKS = """
import os, sys
real, seen = os.fork, []
def fork():
    seen.append("pyarrow" in sys.modules)
    return real()
os.fork = fork
from shardify.cli import main
code = main(["convert", sys.argv[1], "--out", sys.argv[2], "--quiet", "--workers", "2",
             "--profile", sys.argv[3]])
print(code, seen)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILT_IN))
def test_workers_fork_before_pyarrow_is_imported(name: str, tmp_path: Path) -> None:
    """Getting a built-in profile builds no columns: forked workers carry no pyarrow (it costs
    each worker's memory; the bench measures it)."""
    import subprocess
    import sys

    root = get_profile(name).synthesize(tmp_path / "src").root
    done = subprocess.run([sys.executable, "-c", FORKS, str(root), str(tmp_path / "out"), name],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[-2] == "0 [False, False]", done.stdout + done.stderr


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_built_in_profiles_pass_the_checks_a_profile_file_gets(name: str) -> None:
    """get_profile trusts the built-in ones (checking builds columns: pyarrow before the fork);
    this is where they are checked as a user's file would be."""
    import importlib

    from shardify.output.manifest import check_columns
    from shardify.profiles.load import _module_profile

    profile = _module_profile(importlib.import_module(BUILT_IN[name]), name)
    check_columns(profile)
    assert profile is get_profile(name)
