"""`shardify export`: image folders for anomalib's Folder and torchvision's ImageFolder, read
back from disk and compared with the shards (read with tarfile), the manifest and the label
polygons (rendered again here with matplotlib, not Pillow); its refusals; and the CLI's help.

One conversion of the synthetic data (resized to 192 px, so labels hold mapped float points).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import converted_copy, manifest_rows, read_shards
from matplotlib.path import Path as Polygon
from PIL import Image

from shardify.cli import build_parser, main
from shardify.profiles.battery.sample import SynthResult


@pytest.fixture(scope="module")
def out(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_copy(dataset.root, tmp_path_factory, "export", "--resize", "192")


@pytest.fixture(scope="module")
def shards(out: Path) -> dict[str, dict[str, bytes]]:
    return read_shards(out)


def selected(out: Path, split: str, **equal: object) -> list[dict]:
    return [row for row in manifest_rows(out) if row["split"] == split
            and all(row[column] == value for column, value in equal.items())]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def export(out: Path, dest: Path, *options: str) -> int:
    return main(["export", str(out), str(dest), "--quiet", *options])


def usable_polygons(label: dict) -> list[list[float]]:
    """The battery label's defect polygons, read here from the JSON itself."""
    polygons = []
    for defect in label.get("defects") or []:
        points = defect.get("points")
        if isinstance(points, list) and len(points) >= 6 and len(points) % 2 == 0 and all(
                isinstance(v, int | float) for v in points):
            polygons.append(points)
    return polygons


def reference_mask(size: tuple[int, int], polygons: list[list[float]]) -> np.ndarray:
    """True where a pixel's centre lies inside a polygon (label points are continuous)."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5])
    inside = np.zeros(width * height, bool)
    for points in polygons:
        inside |= Polygon(np.reshape(points, (-1, 2))).contains_points(centres)
    return inside.reshape(height, width)


def edge_distance(xs: np.ndarray, ys: np.ndarray, polygons: list[list[float]]) -> np.ndarray:
    """Distance of each pixel centre to the nearest polygon edge."""
    centres = np.column_stack([xs + 0.5, ys + 0.5])
    best = np.full(len(xs), np.inf)
    for points in polygons:
        corners = np.reshape(points, (-1, 2)).astype(float)
        for a, b in zip(corners, np.roll(corners, -1, axis=0), strict=True):
            t = np.clip(((centres - a) @ (b - a)) / max(float((b - a) @ (b - a)), 1e-12), 0, 1)
            best = np.minimum(best, np.linalg.norm(centres - (a + t[:, None] * (b - a)), axis=1))
    return best


def test_folder_layout_is_anomalibs(out: Path, shards: dict, tmp_path: Path) -> None:
    dest = tmp_path / "rgb-train"
    assert export(out, dest, "--split", "train", "--select", "data_type=rgb") == 0
    rows = selected(out, "train", data_type="rgb")
    normal = {f"{r['key']}.{r['image_ext']}": r for r in rows if r["label"] == 0}
    abnormal = {f"{r['key']}.{r['image_ext']}": r for r in rows if r["label"] == 1}
    assert normal and abnormal
    assert sorted(p.name for p in dest.iterdir()) == ["abnormal", "export.json", "masks",
                                                      "normal"]
    assert not list(tmp_path.glob(".*"))  # no staging folder left beside DIR
    for folder, expected in (("normal", normal), ("abnormal", abnormal)):
        written = files(dest / folder)
        assert set(written) == set(expected)
        for name, data in written.items():
            row = expected[name]
            assert data == shards[row["key"]][row["image_ext"]], name  # the shard's bytes
    masks = files(dest / "masks")
    assert set(masks) == {f"{row['key']}.png" for row in abnormal.values()}

    # anomalib pairs masks with abnormal images by sorted path, then checks the stems agree
    pairs = zip(sorted(abnormal), sorted(masks), strict=True)
    assert all(Path(image).stem in Path(mask).stem for image, mask in pairs)

    empty = 0
    for name, row in abnormal.items():
        polygons = usable_polygons(json.loads(shards[row["key"]]["json"]))
        image = Image.open(io.BytesIO(shards[row["key"]][row["image_ext"]]))
        mask = Image.open(io.BytesIO(masks[f"{row['key']}.png"]))
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", image.size), name
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) <= {0, 255}
        white = pixels == 255
        if not polygons:
            empty += 1
            assert not white.any(), name
            continue
        expected_white = reference_mask(image.size, polygons)
        assert expected_white.sum() >= 20, name  # radius 6 px or more, resized to 0.6 or 0.5
        ys, xs = np.nonzero(white != expected_white)  # only a centre on an edge may differ
        assert (edge_distance(xs, ys, polygons) <= 1e-6).all(), name
    assert empty >= 1  # the sample data has defect images without a usable polygon

    record = json.loads((dest / "export.json").read_bytes())
    assert record["samples"] == len(rows)
    assert record["masks_empty"] == empty
    assert {name: row["files"] for name, row in record["folders"].items()} == {
        "normal": len(normal), "abnormal": len(abnormal), "masks": len(abnormal)}
    assert record["folders"]["normal"]["bytes"] == sum(len(d) for d in
                                                       files(dest / "normal").values())


def test_imagefolder_layout_indexes_classes_as_the_manifest(out: Path, shards: dict,
                                                            tmp_path: Path) -> None:
    dest = tmp_path / "ct-test"
    assert export(out, dest, "--split", "test", "--select", "data_type=ct",
                  "--select", "label=0,1", "--layout", "imagefolder") == 0
    rows = selected(out, "test", data_type="ct")
    folders = sorted(p.name for p in dest.iterdir() if p.is_dir())
    assert folders == ["0_normal", "1_defect"]
    for index, folder in enumerate(folders):  # ImageFolder: class index = sorted position
        expected = {f"{r['key']}.{r['image_ext']}": r for r in rows if r["label"] == index}
        written = files(dest / folder)
        assert set(written) == set(expected)
        assert all(data == shards[expected[name]["key"]][expected[name]["image_ext"]]
                   for name, data in written.items())


def test_imagefolder_with_a_class_missing_says_how_imagefolder_numbers_it(
        out: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "defects"
    assert export(out, dest, "--select", "label=1", "--layout", "imagefolder") == 0
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == ["1_defect"]
    assert json.loads((dest / "export.json").read_text())["class_to_idx"] == {"1_defect": 0}
    assert "ImageFolder numbers 1_defect as 0" in capsys.readouterr().out
    both = tmp_path / "both"
    assert export(out, both, "--layout", "imagefolder") == 0
    assert json.loads((both / "export.json").read_text())["class_to_idx"] == {
        "0_normal": 0, "1_defect": 1}
    assert "warning" not in capsys.readouterr().out


def test_select_values_are_typed_and_ored(out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "pouch-normal"
    assert export(out, dest, "--split", "val", "--select", "form=pouch,cylindrical",
                  "--select", "is_normal=true") == 0
    expected = {f"{r['key']}.{r['image_ext']}" for r in selected(out, "val", is_normal=True)}
    assert expected and set(files(dest / "normal")) == expected
    assert not (dest / "abnormal").exists()


def test_refusals_are_one_line_and_write_nothing(out: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    cases = [
        ([str(full)], "is not empty"),
        ([str(full), "--overwrite"], "not an earlier shardify export"),
        ([str(tmp_path / "a"), "--select", "colour=red"], "no column 'colour'"),
        ([str(tmp_path / "b"), "--select", "label=two"], "label holds int8 values"),
        ([str(tmp_path / "c"), "--select", "defect_types=Damaged"], "defect_types holds"),
        ([str(tmp_path / "d"), "--select", "label"], "expected COLUMN=VALUE"),
        ([str(tmp_path / "e"), "--select", "battery_id=999999"], "no train samples"),
        ([str(out / "inside")], "must be outside OUT"),
    ]
    for args, message in cases:
        assert main(["export", str(out), *args, "--quiet"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert [p.name for p in full.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    with pytest.raises(SystemExit) as stop:
        main(["export", str(out), str(tmp_path / "f"), "--split", "dev"])
    assert stop.value.code == 2


def test_overwrite_replaces_an_earlier_export(out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "again"
    assert export(out, dest, "--split", "val") == 0
    assert export(out, dest, "--split", "val", "--select", "data_type=ct") == 2
    assert export(out, dest, "--split", "val", "--select", "data_type=ct", "--overwrite") == 0
    names = {name for folder in ("normal", "abnormal") if (dest / folder).exists()
             for name in files(dest / folder)}
    assert names == {f"{r['key']}.{r['image_ext']}" for r in selected(out, "val",
                                                                      data_type="ct")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_a_corrupt_shard_is_named_and_leaves_nothing(out: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(out)).write_bytes(path.read_bytes())
    row = selected(out, "val")[0]
    shard = copy / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + 512 + row["image_bytes"] // 2] ^= 0xFF  # one byte of its image
    shard.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    assert export(copy, dest, "--split", "val") == 1
    err = capsys.readouterr().err
    assert f"{row['shard']}:{row['key']}: image CRC-32" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_a_stale_staging_folder_is_removed_only_if_export_made_it(out: Path,
                                                                  tmp_path: Path) -> None:
    staging = tmp_path / ".dest.shardify-export.partial"
    staging.mkdir()
    (staging / "other.txt").write_text("not ours")
    assert export(out, tmp_path / "dest", "--split", "val") == 2
    assert [p.name for p in staging.iterdir()] == ["other.txt"]
    (staging / ".shardify-export-partial").touch()  # what an export killed with -9 leaves
    assert export(out, tmp_path / "dest", "--split", "val") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


@pytest.mark.skipif(importlib.util.find_spec("anomalib") is None,
                    reason="anomalib is not installed in this interpreter")
def test_anomalib_folder_loads_an_export(out: Path, tmp_path: Path) -> None:
    """The README's recipe: train normals and the test split, exported by split (no battery
    in both), loaded with anomalib's Folder datamodule."""
    from anomalib.data import Folder

    assert export(out, tmp_path / "train", "--split", "train", "--select", "label=0") == 0
    assert export(out, tmp_path / "test", "--split", "test") == 0
    datamodule = Folder(name="battery", root=tmp_path, normal_dir="train/normal",
                        normal_test_dir="test/normal", abnormal_dir="test/abnormal",
                        mask_dir="test/masks", num_workers=0, seed=0)
    datamodule.setup()
    assert len(datamodule.train_data) == len(selected(out, "train", label=0))
    assert len(datamodule.val_data) + len(datamodule.test_data) == len(selected(out, "test"))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_help_lists_exit_codes_once_and_every_argument_has_help(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert "exit codes:" in parser.format_help() and "143" in parser.format_help()
    commands = subcommands(parser)
    assert {"convert", "scan", "verify", "report", "synth", "export"} <= set(commands)
    for name, command in [("shardify", parser), *commands.items()]:
        if command is not parser:
            text = command.format_help()
            assert "143" not in text and "see shardify --help" in text, name
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.count("exit codes:") == 1
