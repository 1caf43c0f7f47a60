"""`convert --crop outline --resize N --format F`: written pixels and labels, read back with PIL.

The inputs are built here, so every expected pixel is known: a bright battery on a dark slice
with a white defect square, an RGBA photo whose outline uses the top-level layout, an EXIF-turned
photo, labels without a usable outline, an odd-length point list and an image that only a
decoder can find broken.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import manifest_rows, read_shards, reject_rows, summary_of
from PIL import Image, ImageCms, ImageDraw, ImageFilter, ImageOps

from shardify.cli import main
from shardify.profiles.battery import GEOMETRY
from shardify.profiles.battery.sample import (
    CT_BACKGROUND,
    DEFECT_COLOURS,
    RGB_BACKGROUND,
    SynthResult,
)
from shardify.synth import ZipEntry, write_zip
from shardify.transform.geometry import Box, Placement, crop_box, map_label, orient_point
from shardify.transform.options import TransformOptions
from shardify.transform.sample import transform_sample
from shardify.write.tar import sample_chunks

CT_SIZE, RGB_SIZE = (320, 320), (240, 160)
DEFECT_GREY, DEFECT_RGB = 255, (230, 20, 20, 255)


def _label(data_type: str, battery: int, name: str, size: tuple[int, int],
           outline: list[int] | None, defects: list[list[int]], layout: str) -> dict:
    label: dict = {
        "data_info": {"data_type": data_type, "battery_ids": battery, "type": "cell",
                      "form": "pouch", "roi": [12, 84] if data_type == "ct" else None},
        "swelling": {"swelling": False},
        "defects": [{"id": i, "name": "porosity", "points": p} for i, p in enumerate(defects)]
        or None,
        "image_info": {"width": size[0], "height": size[1], "file_name": name,
                       "is_normal": not defects},
    }
    if outline is not None and layout == "swelling":
        label["swelling"]["battery_outline"] = outline
    elif outline is not None:  # the top-level layout, right after "swelling"
        label = {"data_info": label["data_info"], "swelling": label["swelling"],
                 "battery_outline": {"points": outline}, "defects": label["defects"],
                 "image_info": label["image_info"]}
    return label


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[int]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ct(offset: int) -> tuple[bytes, list[int], list[int]]:
    """A grey slice: battery (160) at a per-battery place, a white defect square inside it."""
    pixels = np.full(CT_SIZE[::-1], 20, np.uint8)
    x0, y0 = 60 + offset, 80 + offset // 2
    pixels[y0:y0 + 90, x0:x0 + 60] = 160
    pixels[y0 + 30:y0 + 60, x0 + 15:x0 + 45] = DEFECT_GREY
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "JPEG", quality=95)
    return out.getvalue(), _rect(x0, y0, x0 + 60, y0 + 90), _rect(x0 + 15, y0 + 30, x0 + 45,
                                                                   y0 + 60)


def _rgba(orientation: int = 1) -> tuple[bytes, list[int], list[int]]:
    """A photo with alpha: blue cell, red defect square, a transparent corner."""
    image = Image.new("RGBA", RGB_SIZE, (200, 200, 205, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 30, 159, 109), fill=(60, 90, 150, 255))
    draw.rectangle((80, 50, 119, 89), fill=DEFECT_RGB)
    draw.rectangle((0, 0, 9, 9), fill=(0, 0, 0, 0))
    out = io.BytesIO()
    if orientation == 1:
        image.save(out, "PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.convert("RGB").save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue(), _rect(40, 30, 160, 110), _rect(80, 50, 120, 90)


def _broken_png() -> bytes:
    """Chunk structure intact (signature, IHDR, IDAT, IEND, right CRCs); the pixels are not."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", b"not zlib data at all") + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transform") / "src"
    root.mkdir()
    images, labels = [], []

    def add(name: str, data: bytes, label: dict) -> None:
        images.append(ZipEntry(name, data))
        labels.append(ZipEntry(name.rsplit(".", 1)[0] + ".json", json.dumps(label).encode()))

    for battery in range(101, 106):
        for n in range(3):
            data, outline, defect = _ct(10 * battery % 70 + 5 * n)
            name = f"CT_cell_pouch_{battery}_x_{n:03d}.jpg"
            add(name, data, _label("ct", battery, name, CT_SIZE, outline, [defect],
                                   "swelling" if battery % 2 else "top"))
    for battery in range(1001, 1006):
        for n in range(2):
            data, outline, defect = _rgba()
            name = f"RGB_cell_pouch_{battery}_{n:03d}.png"
            add(name, data, _label("rgb", battery, name, RGB_SIZE, outline, [defect], "top"))
    data, outline, defect = _rgba(orientation=6)
    add("RGB_cell_pouch_1006_000.jpg", data,
        _label("rgb", 1006, "x", RGB_SIZE, outline, [defect], "swelling"))
    data, _, defect = _ct(0)
    add("CT_cell_pouch_106_x_000.jpg", data,
        _label("ct", 106, "x", CT_SIZE, None, [defect], "swelling"))  # no outline
    add("CT_cell_pouch_106_x_001.jpg", data,
        _label("ct", 106, "x", CT_SIZE, [10, 10, 20, 20], [defect[:7]], "swelling"))
    add("RGB_cell_pouch_1007_000.png", _broken_png(),
        _label("rgb", 1007, "x", RGB_SIZE, None, [], "swelling"))
    write_zip(root / "images.zip", images)
    write_zip(root / "labels.zip", labels)
    return root


def _convert(source: Path, out: Path, *options: str, workers: str = "2") -> int:
    return main(["convert", str(source), "--out", str(out), "--quiet", "--workers", workers,
                 "--shard-size", "64KiB", *options])


@pytest.fixture(scope="module")
def cropped(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cropped") / "out"
    assert _convert(source, out, "--crop", "outline", "--crop-margin", "8", "--resize", "48") == 0
    return out


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _inside(image: Image.Image, points: list[float], shrink: int) -> np.ndarray:
    """Pixels strictly inside the bounding box of `points`, `shrink` px in from its edges."""
    xs, ys = points[0::2], points[1::2]
    box = (int(min(xs)) + shrink, int(min(ys)) + shrink, int(max(xs)) - shrink,
           int(max(ys)) - shrink)
    assert box[2] > box[0] and box[3] > box[1], box
    return np.asarray(image)[box[1]:box[3], box[0]:box[2]]


def test_defect_pixels_and_outline_follow_the_label(cropped: Path) -> None:
    samples = read_shards(cropped)
    rows = {row["key"]: row for row in manifest_rows(cropped)}
    checked = 0
    for key, members in samples.items():
        label = json.loads(members["json"])
        image = _decoded(members.get("jpg") or members["png"])
        row = rows[key]
        assert image.size == (row["width"], row["height"]) == (
            label["image_info"]["width"], label["image_info"]["height"])
        assert max(image.size) <= 48
        defects = label["defects"] or []
        outline = label.get("battery_outline", {}).get("points") or label["swelling"].get(
            "battery_outline")
        if row["crop_box"] is None or len(defects[0]["points"]) % 2:
            continue
        defect = np.asarray(_inside(image, defects[0]["points"], 2), np.int16)
        if key.startswith("CT"):
            assert image.mode == "L"
            assert np.abs(defect - DEFECT_GREY).max() <= 40, key
            battery = np.asarray(image) > 100
        else:
            assert image.mode in ("RGBA", "RGB")
            assert np.abs(defect[..., :3] - DEFECT_RGB[:3]).max() <= 40, key
            rgb = np.asarray(image.convert("RGB"), np.int16)
            battery = (rgb[..., 0] < 130) & (rgb[..., 2] > 110)  # the blue cell
        # Every battery pixel lies inside the mapped outline's box (1 px of resampling blur).
        ys, xs = np.nonzero(battery)
        assert min(outline[0::2]) - 1 <= xs.min() and xs.max() + 1 <= max(outline[0::2]) + 1
        assert min(outline[1::2]) - 1 <= ys.min() and ys.max() + 1 <= max(outline[1::2]) + 1
        checked += 1
    assert checked == 15 + 10 + 1


def test_manifest_and_summary_describe_source_and_output(cropped: Path, source: Path) -> None:
    rows = {row["key"]: row for row in manifest_rows(cropped)}
    ct = rows["CT_cell_pouch_101_x_000"]
    assert (ct["source_width"], ct["source_height"]) == CT_SIZE
    x0, y0 = 60 + 10 * 101 % 70, 80 + (10 * 101 % 70) // 2
    assert ct["crop_box"] == [x0 - 8, y0 - 8, x0 + 68, y0 + 98]
    assert ct["scale"] == pytest.approx(48 / 106)
    assert (ct["width"], ct["height"]) == (round(76 * 48 / 106), 48)
    with __import__("zipfile").ZipFile(source / "images.zip") as zf:
        info = zf.getinfo("CT_cell_pouch_101_x_000.jpg")
    assert (ct["source_bytes"], ct["source_crc32"]) == (info.file_size, info.CRC)
    assert ct["image_bytes"] < info.file_size
    assert rows["CT_cell_pouch_106_x_000"]["crop_box"] is None  # no outline: whole image
    assert rows["CT_cell_pouch_106_x_001"]["crop_box"] is None  # two points: not an outline
    turned = rows["RGB_cell_pouch_1006_000"]
    assert (turned["source_width"], turned["source_height"]) == RGB_SIZE[::-1]
    summary = summary_of(cropped)
    assert summary["transformed"] == {"images": 28, "cropped": 26, "no_outline": 2,
                                      "unmapped_point_lists": 1, "continuation_shards": 0}
    assert summary["options"]["transform"]["resize"] == 48
    bad = [r for r in reject_rows(cropped) if r["reason"] == "bad-image"]
    assert {(r["key"], r["source_archive"]) for r in bad} == {
        ("RGB_cell_pouch_1007_000", "images.zip"), ("RGB_cell_pouch_1007_000", "labels.zip")}
    assert "cannot decode" in bad[0]["detail"]


def test_labels_keep_their_layout_keys_and_unexplained_values(cropped: Path) -> None:
    samples = read_shards(cropped)
    top = json.loads(samples["CT_cell_pouch_102_x_000"]["json"])
    flat = json.loads(samples["CT_cell_pouch_101_x_000"]["json"])
    assert list(top) == ["data_info", "swelling", "battery_outline", "defects", "image_info"]
    assert "battery_outline" not in top["swelling"] and "battery_outline" in flat["swelling"]
    assert list(flat) == ["data_info", "swelling", "defects", "image_info"]
    assert top["data_info"]["roi"] == [12, 84]  # not explained anywhere: kept as it was
    odd = json.loads(samples["CT_cell_pouch_106_x_001"]["json"])["defects"][0]["points"]
    assert len(odd) == 7 and odd == _ct(0)[2][:7]  # odd length: kept unmapped


def test_exif_orientation_is_applied_to_pixels_and_points(cropped: Path, source: Path) -> None:
    members = read_shards(cropped)["RGB_cell_pouch_1006_000"]
    label = json.loads(members["json"])
    image = np.asarray(_decoded(members["jpg"]), np.int16)
    assert image.shape[0] > image.shape[1]  # the 240x160 photo is upright: 160 wide
    defect = _inside(Image.fromarray(image.astype(np.uint8)), label["defects"][0]["points"], 2)
    assert np.abs(defect - DEFECT_RGB[:3]).max() <= 40
    for orientation in range(1, 9):  # the point rule against PIL's own exif_transpose
        dot = Image.new("L", (40, 30))
        dot.putpixel((31, 5), 255)
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        dot.save(buffer, "PNG", exif=exif)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
        y, x = np.argwhere(upright == 255)[0]
        assert orient_point(31.5, 5.5, orientation, 40, 30) == (x + 0.5, y + 0.5)


def test_geometry_rules() -> None:
    assert crop_box([5, 5, 5, 50, 5, 9], 2, 100, 100) is None  # all on one line
    assert crop_box([90, 90, 120, 95, 100, 130], 4, 100, 100) == Box(86, 86, 100, 100)
    document = {"swelling": {"battery_outline": [10, 10, 30, 10, 30, 20]},
                "defects": [{"points": [12, 12, 14, 14, 13]}, {"points": ["a", 1]}],
                "image_info": {"width": 100, "height": 50}}
    unmapped = map_label(document, GEOMETRY, 1, (100, 50), Placement(Box(10, 10, 30, 20), 10, 5))
    assert unmapped == 2
    assert document["swelling"]["battery_outline"] == [0, 0, 10.0, 0, 10.0, 5.0]
    assert document["image_info"] == {"width": 10, "height": 5}


@pytest.mark.parametrize(("fmt", "ct_ext", "rgb_ext", "rgb_mode"), [
    ("keep", "jpg", "png", "RGBA"), ("jpeg", "jpg", "jpg", "RGB"), ("png", "png", "png", "RGBA"),
    ("webp", "webp", "webp", "RGBA")])
def test_formats_keep_modes_where_they_can(source: Path, tmp_path: Path, fmt: str, ct_ext: str,
                                           rgb_ext: str, rgb_mode: str) -> None:
    out = tmp_path / "out"
    assert _convert(source, out, "--format", fmt, workers="1") == 0
    samples = read_shards(out)
    ct, rgb = samples["CT_cell_pouch_101_x_000"], samples["RGB_cell_pouch_1001_000"]
    assert _decoded(ct[ct_ext]).mode == ("L" if ct_ext != "webp" else "RGB")
    assert _decoded(rgb[rgb_ext]).mode == rgb_mode
    assert _decoded(rgb[rgb_ext]).size == RGB_SIZE  # no crop, no resize: the whole image
    rows = {row["key"]: row for row in manifest_rows(out)}
    assert rows["RGB_cell_pouch_1001_000"]["image_ext"] == rgb_ext
    if fmt in ("png", "webp"):  # lossless: the source's pixels exactly
        with __import__("zipfile").ZipFile(source / "images.zip") as zf:
            original = np.asarray(_decoded(zf.read("RGB_cell_pouch_1001_000.png")))
        assert np.array_equal(np.asarray(_decoded(rgb[rgb_ext])), original)
    assert main(["verify", str(out), "--sources", str(source)]) == 0


def test_same_inputs_give_the_same_bytes_and_verify_passes(source: Path, cropped: Path,
                                                           tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert _convert(source, again, "--crop", "outline", "--crop-margin", "8", "--resize", "48",
                    workers="1") == 0
    for shard in sorted(cropped.glob("*/*.tar")):
        assert (again / shard.relative_to(cropped)).read_bytes() == shard.read_bytes()
    assert main(["verify", str(cropped), "--sources", str(source)]) == 0


def test_a_resumed_run_with_other_transform_options_is_refused(source: Path, cropped: Path,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture
                                                              ) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(cropped), str(copy)], check=True)
    assert _convert(source, copy, "--crop", "outline", "--resize", "48") == 2  # margin 16
    error = capsys.readouterr().err
    assert "holds shards of another conversion" in error and "'crop_margin': 8" in error
    assert "'crop_margin': 16" in error


def test_verify_finds_a_wrong_pixel_with_consistent_crcs(source: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """One pixel changed and the shard and manifest rewritten around it, so every size, offset
    and CRC agrees: only the re-transform from the sources can see it."""
    out = tmp_path / "out"
    assert _convert(source, out, "--crop", "outline", "--resize", "48", "--format", "png",
                    workers="1") == 0
    table = pq.read_table(out / "manifest.parquet")
    rows = table.to_pylist()
    victim = rows[0]
    shard = out / victim["shard"]
    samples = read_shards(out)
    rewritten, offset = [], 0
    for row in [r for r in rows if r["shard"] == victim["shard"]]:
        members = samples[row["key"]]
        image = members["png"]
        if row["key"] == victim["key"]:
            pixels = _decoded(image)
            pixels.putpixel((0, 0), 0 if pixels.getpixel((0, 0)) else 255)
            buffer = io.BytesIO()
            pixels.save(buffer, "PNG")
            image = buffer.getvalue()
        chunks = sample_chunks(row["key"], "png", image, members["json"], members["cls"])
        size = sum(map(len, chunks))
        row.update(offset=offset, sample_bytes=size, image_bytes=len(image),
                   crc32=zlib.crc32(image))
        rewritten += chunks
        offset += size
    shard.write_bytes(b"".join(rewritten) + bytes(1024))
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / "manifest.parquet")
    assert main(["verify", str(out)]) == 0  # consistent with itself
    assert main(["verify", str(out), "--sources", str(source)]) == 1
    assert "written pixels differ from a new transform" in capsys.readouterr().out


def test_sigkill_mid_run_with_transforms_resumes_to_the_same_bytes(source: Path, cropped: Path,
                                                                 tmp_path: Path) -> None:
    from test_resume import CHILD

    out = tmp_path / "out"
    args = ["convert", str(source), "--out", str(out), "--quiet", "--workers", "2",
            "--shard-size", "64KiB", "--crop", "outline", "--crop-margin", "8", "--resize", "48"]
    killed = subprocess.run([sys.executable, "-c", CHILD, "shardify.output.store:OutputStore",
                             "append_journal", "2", "after", *args], capture_output=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert main(args) == 0
    for shard in sorted(cropped.glob("*/*.tar")):
        assert (out / shard.relative_to(cropped)).read_bytes() == shard.read_bytes()
    assert (out / "manifest.parquet").read_bytes() == (cropped / "manifest.parquet").read_bytes()


@pytest.mark.parametrize("options", [("--crop", "outline", "--resize", "48"),
                                     ("--format", "png")])  # the second makes JPEGs larger
def test_shards_stay_within_the_size_planned_on_estimates(source: Path, tmp_path: Path,
                                                          options: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    assert _convert(source, out, *options, workers="1") == 0
    _assert_within(out, 64 * 1024)


def _assert_within(out: Path, limit: int) -> None:
    """Every shard is within `limit`, unless it holds a single sample."""
    rows = manifest_rows(out)
    for shard in sorted(out.glob("*/*.tar")):
        held = [r for r in rows if out / r["shard"] == shard]
        assert shard.stat().st_size <= limit or len(held) == 1, shard


def test_open_dataset_reads_transformed_shards(source: Path, tmp_path: Path) -> None:
    from shardify.loader import open_dataset

    out = tmp_path / "out"
    assert _convert(source, out, "--crop", "outline", "--resize", "40", "--format", "webp",
                    workers="1") == 0
    rows = {row["key"]: row for row in manifest_rows(out) if row["split"] == "train"}
    seen = 0
    for image, label, meta in open_dataset(out, "train", shuffle=0):
        row = rows[meta["key"]]
        assert image.size == (row["width"], row["height"]) and label == row["label"]
        seen += 1
    assert seen == len(rows) > 0


@pytest.mark.parametrize("resize", ["256", "64"])  # crop only (never enlarged), crop + shrink
def test_sample_data_defects_keep_their_colour_after_crop_and_resize(
        dataset: SynthResult, tmp_path: Path, resize: str) -> None:
    """On `shardify synth`'s data: inside each mapped defect polygon of the written JSON the
    written pixels have the defect's colour; the mapped outline encloses the object."""
    out = tmp_path / "out"
    assert main(["convert", str(dataset.root), "--out", str(out), "--quiet", "--workers", "2",
                 "--crop", "outline", "--resize", resize]) == 0
    summary = summary_of(out)
    assert summary["transformed"]["no_outline"] == dataset.no_outline
    assert summary["transformed"]["unmapped_point_lists"] == dataset.odd_point_lists
    checked = 0
    for key, members in read_shards(out).items():
        label = json.loads(members["json"])
        image = _decoded(members.get("jpg") or members["png"])
        bands = np.asarray(image, np.int16).reshape(image.height, image.width, -1)
        for defect in label["defects"] or []:
            points = defect["points"]
            if len(points) % 2:
                continue
            mask = Image.new("L", image.size)
            ImageDraw.Draw(mask).polygon(list(zip(points[0::2], points[1::2], strict=True)),
                                         fill=255)
            inside = np.asarray(mask.filter(ImageFilter.MinFilter(3))) > 0  # 1 px in
            colour = DEFECT_COLOURS[defect["name"].lower()]
            assert inside.any(), key
            assert np.abs(bands[inside] - colour).max() <= 40, key
            checked += 1
        outline = label.get("battery_outline", {}).get("points") or label["swelling"].get(
            "battery_outline")
        if outline and len(outline) >= 6 and len(outline) % 2 == 0:
            mask = Image.new("L", image.size)
            ImageDraw.Draw(mask).polygon(list(zip(outline[0::2], outline[1::2], strict=True)),
                                         fill=255)
            grown = np.asarray(mask.filter(ImageFilter.MaxFilter(3))) > 0  # 1 px of blur
            background = CT_BACKGROUND if key.startswith("CT") else RGB_BACKGROUND
            away = np.abs(bands - background).max(axis=2) > 40  # object (and defect) pixels
            assert not (away & ~grown).any(), key
    assert checked > 10


def test_a_shard_whose_every_sample_is_rejected_while_writing_is_not_kept(
        source: Path, tmp_path: Path) -> None:
    """One sample per shard: the undecodable PNG's shard would be an empty tar."""
    out = tmp_path / "out"
    args = ["convert", str(source), "--out", str(out), "--quiet", "--workers", "2",
            "--shard-size", "1KiB", "--format", "png"]
    assert main(args) == 0
    listed = [name for split in summary_of(out)["splits"].values() for name in split["shards"]]
    present = sorted(p.relative_to(out).as_posix() for p in out.glob("*/shard-*.tar"))
    assert sorted(listed) == present and len(present) == len(manifest_rows(out)) == 28
    import webdataset as wds

    assert sum(1 for _ in wds.WebDataset([str(out / name) for name in listed],
                                         shardshuffle=False)) == 28
    assert main(["verify", str(out)]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
              and ".shardify" not in p.parts}
    assert main(args) == 0  # a re-run resumes: the same files
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and ".shardify" not in p.parts} == before


@pytest.mark.parametrize("options", [
    ("--crop", "outline"),  # crop only: source pixels, no scaling
    ("--resize", "100"),  # resize only: the whole image, longer side 100
    ("--quality", "70"),  # re-encode only
    ("--crop", "outline", "--crop-margin", "0", "--format", "jpeg", "--quality", "80"),
    ("--resize", "1000"),  # larger than every image: never enlarged
])
def test_every_option_combination_gives_what_it_says(source: Path, tmp_path: Path,
                                                     options: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    assert _convert(source, out, *options, workers="1") == 0
    samples = read_shards(out)
    margin = int(options[options.index("--crop-margin") + 1]) if "--crop-margin" in options \
        else 16
    for row in manifest_rows(out):
        image = _decoded(samples[row["key"]][row["image_ext"]])
        assert image.size == (row["width"], row["height"])
        upright = (row["source_width"], row["source_height"])
        if "--crop" in options and row["crop_box"] is not None:
            x0, y0, x1, y1 = row["crop_box"]
            source_label = json.loads(samples[row["key"]]["json"])
            assert image.size == (x1 - x0, y1 - y0) and row["scale"] == 1.0
            assert x0 >= 0 and y0 >= 0 and x1 <= upright[0] and y1 <= upright[1]
            outline = source_label.get("battery_outline", {}).get("points") or \
                source_label["swelling"]["battery_outline"]
            # The mapped outline's box is the crop box less its margin (where not clamped).
            if x0 > 0 and y0 > 0:
                assert (min(outline[0::2]), min(outline[1::2])) == (margin, margin)
        elif "--resize" in options:
            limit = int(options[options.index("--resize") + 1])
            assert max(image.size) == min(limit, max(upright))
        else:
            assert image.size == upright
        if "--format" in options:
            assert row["image_ext"] == "jpg"
    assert main(["verify", str(out), "--sources", str(source)]) == 0


def _png(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


def test_hostile_images_and_labels_are_rejects_and_the_run_goes_on(tmp_path: Path) -> None:
    """Too wide for WebP, 16 bits for an 8-bit format, a point that overflows once mapped."""
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    grey16 = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    cases = {"RGB_cell_pouch_0001_000": (_png(Image.new("RGB", (17000, 8))), None),
             "RGB_cell_pouch_0002_000": (_png(grey16), None),
             "RGB_cell_pouch_0003_000": (_png(Image.new("RGB", (64, 48))), [-2**63, 5, 9, 5]),
             "RGB_cell_pouch_0004_000": (_png(Image.new("RGB", (64, 48))), [5, 5, 9, 5])}
    images, labels = [], []
    for number, (key, (data, defect)) in enumerate(cases.items()):
        images.append(ZipEntry(f"{key}.png", data))
        label = _label("rgb", number + 1, key, (64, 48), _rect(10, 10, 40, 30),
                       [defect] if defect else [], "swelling")
        labels.append(ZipEntry(f"{key}.json", json.dumps(label).encode()))
    write_zip(source / "images.zip", images)
    write_zip(source / "labels.zip", labels)
    assert main(["convert", str(source), "--out", str(out), "--quiet", "--workers", "1",
                 "--format", "webp", "--crop", "outline", "--crop-margin", "0"]) == 0
    found = {r["key"]: (r["reason"], r["detail"]) for r in reject_rows(out)
             if r["source_archive"] == "images.zip"}
    assert found["RGB_cell_pouch_0001_000"][0] == "bad-image"
    assert "cannot write as WEBP" in found["RGB_cell_pouch_0001_000"][1]
    assert "high bit depth" in found["RGB_cell_pouch_0002_000"][1]
    assert found["RGB_cell_pouch_0003_000"][0] == "bad-label"
    assert [row["key"] for row in manifest_rows(out)] == ["RGB_cell_pouch_0004_000"]


def _transform(data: bytes, size: tuple[int, int], defects: list[list[int]], ext: str,
               **options: object) -> tuple[Image.Image, dict]:
    label = _label("ct", 1, "x", size, None, defects, "swelling")
    done = transform_sample(data, json.dumps(label).encode(), ext,
                            TransformOptions(**options), GEOMETRY)  # type: ignore[arg-type]
    return _decoded(done.image), json.loads(done.label)


def test_dct_reduced_jpegs_keep_points_on_their_pixels() -> None:
    """A side that is not a multiple of the 1/8 decode scale: the label must not drift."""
    pixels = np.zeros((1025, 1025), np.uint8)
    pixels[900:1000, 900:1000] = 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=100)
    image, label = _transform(out.getvalue(), (1025, 1025), [_rect(900, 900, 1000, 1000)],
                              "jpg", resize=128, format="png")
    weights = np.asarray(image, float)
    xs = np.indices(weights.shape)[1]
    centroid = ((xs + 0.5) * weights).sum() / weights.sum()
    points = label["defects"][0]["points"]
    assert abs(centroid - (points[0] + points[4]) / 2) < 0.1


def test_colour_profiles_and_png_transparency_are_kept() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(out, "JPEG", icc_profile=profile)
    for fmt in ("keep", "webp", "png"):
        image, _ = _transform(out.getvalue(), (64, 48), [], "jpg", resize=32, format=fmt)
        assert image.info.get("icc_profile") == profile, fmt
    grey = Image.new("L", (64, 48), 7)
    grey.paste(200, (0, 0, 32, 48))
    image, _ = _transform(_png(grey, transparency=7), (64, 48), [], "png", resize=32)
    assert image.mode == "LA"
    alpha = np.asarray(image)[..., 1]
    assert alpha[:, :12].min() == 255 and alpha[:, -12:].max() == 0


def _outgrowing_source(tmp_path: Path) -> Path:
    """Ten CT batteries of noise; the last has no outline: kept whole, its images are ~10x the
    cropped ones' estimate, so its shards continue."""
    source = tmp_path / "src"
    source.mkdir()
    images, labels = [], []
    rng = np.random.default_rng(0)
    for battery in range(101, 111):
        for n in range(4):
            noisy = np.clip(rng.normal(100, 40, CT_SIZE), 0, 255).astype(np.uint8)
            data, outline = _png(Image.fromarray(noisy)), _rect(60, 80, 120, 170)
            key = f"CT_cell_pouch_{battery}_x_{n:03d}"
            images.append(ZipEntry(f"{key}.png", data))
            label = _label("ct", battery, key, CT_SIZE, None if battery == 110 else outline, [],
                           "swelling")
            labels.append(ZipEntry(f"{key}.json", json.dumps(label).encode()))
    write_zip(source / "images.zip", images)
    write_zip(source / "labels.zip", labels)
    return source


def test_shards_that_come_out_larger_than_planned_continue_in_a_continuation_shard(
        tmp_path: Path) -> None:
    """The outline-less battery's shards must end at the limit and go on in
    `shard-NNNNNN_K.tar`; a kill in the middle resumes to the same bytes."""
    from test_resume import CHILD

    source = _outgrowing_source(tmp_path)
    args = ["convert", str(source), "--out", str(tmp_path / "clean"), "--quiet", "--workers",
            "2", "--shard-size", "48KiB", "--crop", "outline"]
    assert main(args) == 0
    clean = tmp_path / "clean"
    continuations = sorted(p.name for p in clean.glob("*/shard-*_*.tar"))
    assert continuations and summary_of(clean)["transformed"]["continuation_shards"] == len(
        continuations)
    assert len(manifest_rows(clean)) == 40
    _assert_within(clean, 48 * 1024)
    assert main(["verify", str(clean), "--sources", str(source)]) == 0
    killed_args = [*args[:3], str(tmp_path / "killed"), *args[4:]]
    killed = subprocess.run([sys.executable, "-c", CHILD, "shardify.output.store:OutputStore",
                             "append_journal", "3", "after", *killed_args], capture_output=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert main(killed_args) == 0
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file()
                   and ".shardify" not in p.parts)
    assert files == sorted(p.relative_to(tmp_path / "killed") for p in
                           (tmp_path / "killed").rglob("*") if p.is_file()
                           and ".shardify" not in p.parts)
    for name in files:
        assert (tmp_path / "killed" / name).read_bytes() == (clean / name).read_bytes(), name


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_redone_shard_that_continues_keeps_one_continuation(tmp_path: Path,
                                                              workers: str) -> None:
    """A cut shard that had a continuation is redone: the journal then holds two entries for it
    (the first is valid again, the bytes are the same). Later runs must still plan its
    continuation once: no shard or sample listed twice, no two jobs writing one file."""
    from helpers import output_files

    source = _outgrowing_source(tmp_path)
    clean, out = tmp_path / "clean", tmp_path / "out"
    args = ["convert", str(source), "--quiet", "--workers", workers, "--shard-size", "48KiB",
            "--crop", "outline", "--out"]
    assert main([*args, str(clean)]) == 0 and main([*args, str(out)]) == 0
    journal = (out / ".shardify" / "journal.jsonl").read_text().splitlines()
    parent = next(e["shard"] for e in map(json.loads, journal) if "rest" in e)
    (out / parent).write_bytes((out / parent).read_bytes()[:-1024])
    assert main([*args, str(out)]) == 0  # the cut shard is redone
    (out / parent.replace(".tar", "_1.tar")).unlink()  # its continuation is to be redone too
    assert main([*args, str(out)]) == 0
    assert main([*args, str(out)]) == 0
    assert output_files(out) == output_files(clean)


def test_manifest_rows_keep_continuations_after_their_shard(tmp_path: Path) -> None:
    """`_10` comes after `_9` (by name it would come before `_2`): the rows' order is the wids
    index's, which open_indexed numbers samples by."""
    from shardify.loader import manifest_rows
    from shardify.output.store import continuation_name

    names = ["train/shard-000000.tar"]
    for _ in range(11):
        names.append(continuation_name(names[-1]))
    names.append("train/shard-000001.tar")
    table = pa.table({"key": [f"k{i}" for i in range(len(names))], "split": ["train"] *
                      len(names), "shard": names[::-1], "offset": [0] * len(names)})
    pq.write_table(table, tmp_path / "manifest.parquet")
    assert manifest_rows(tmp_path).column("shard").to_pylist() == names


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpegs_decoded_only_down_to_the_box_give_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch, mode: str, progressive: bool) -> None:
    """Shortened decodes (baseline JPEGs) against whole ones, for boxes high, low and at the
    bottom edge, cropped only and resampled, with and without a DCT draft."""
    from shardify.transform import pixels

    rng = np.random.default_rng(1)
    shape = (700, 500) if mode == "L" else (700, 500, 3)
    out = io.BytesIO()
    Image.fromarray(np.clip(rng.normal(120, 60, shape), 0, 255).astype(np.uint8), mode).save(
        out, "JPEG", quality=90, progressive=progressive, subsampling=2)
    data = out.getvalue()
    cases = [(_rect(100, 40, 300, 200), None), (_rect(100, 40, 300, 200), 60),
             (_rect(50, 400, 450, 690), 100), (_rect(10, 10, 480, 690), 50),
             (_rect(200, 300, 260, 380), None)]
    for outline, resize in cases:
        label = json.dumps(_label("ct", 1, "x", (500, 700), outline, [], "swelling")).encode()
        options = TransformOptions(crop="outline", crop_margin=4, resize=resize)
        shortened = transform_sample(data, label, "jpg", options, GEOMETRY)
        inflated = transform_sample(bytearray(data), label, "jpg", options, GEOMETRY)
        with monkeypatch.context() as patch:
            patch.setattr(pixels, "_top_rows", lambda source, rows: source.image)
            whole = transform_sample(data, label, "jpg", options, GEOMETRY)
        assert shortened.image == whole.image == inflated.image, outline
        assert shortened.label == whole.label == inflated.label, outline


def test_buffer_file_reads_as_bytesio_of_the_patched_bytes() -> None:
    """Pillow reads sources through BufferFile (no copy): every read and seek, inside, across
    and past the patch, gives what BytesIO of the patched copy gives."""
    from shardify.transform.pixels import BufferFile

    rng = np.random.default_rng(5)
    data = bytearray(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for patch_at, patch in [(0, b""), (0, b"ab"), (4998, b"yz"), (1234, b"PATCH")]:
        patched = bytearray(data)
        patched[patch_at:patch_at + len(patch)] = patch
        ours, theirs = BufferFile(data, patch_at, patch), io.BytesIO(bytes(patched))
        for _ in range(300):
            if rng.random() < 0.3:
                offset, whence = int(rng.integers(-50, 5100)), int(rng.integers(0, 3))
                if whence == 0:
                    offset = abs(offset)
                if theirs.tell() + offset < 0 or (whence == 2 and 5000 + offset < 0):
                    continue
                assert ours.seek(offset, whence) == theirs.seek(offset, whence)
            size = int(rng.choice([-1, 0, 1, 2, 7, 64, 3000]))
            assert ours.read(size) == theirs.read(size)
            assert ours.tell() == theirs.tell()
        buffer = bytearray(10)
        ours.seek(patch_at)
        theirs.seek(patch_at)
        assert ours.readinto(buffer) == theirs.readinto(into := bytearray(10))
        assert buffer == into
