"""The planning rules as pure functions: labels, keys, split, shard cutting, image checks, CLI."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from helpers import source_ext
from PIL import Image

from shardify.archives.model import Archive, Member, MemberTable
from shardify.cli import main, parse_size
from shardify.errors import BadLabel
from shardify.output.store import shard_name
from shardify.plan.pairing import SAFE_KEY, Sample, safe_key
from shardify.plan.shards import ShardSizes, plan_shards
from shardify.plan.split import assign_splits, parse_ratios
from shardify.profiles import Stratum
from shardify.profiles.battery.labels import BatteryFields, parse_label
from shardify.profiles.battery.sample import SynthResult
from shardify.profiles.load import get_profile
from shardify.write.images import image_problem
from shardify.write.tar import TAR_END_SIZE, planned_sample_bytes

LABEL = {
    "data_info": {"data_type": "CT", "battery_ids": 101, "type": "cell", "form": "pouch"},
    "swelling": {"swelling": False, "battery_outline": [1, 2, 3, 4]},
    "defects": [{"id": 1, "name": "porosity", "points": [1, 2, 3]},
                {"id": 2, "name": "resin overflow", "points": [1]},
                {"id": 3, "name": "porosity", "points": []}],
    "image_info": {"width": 4000, "height": 4000, "file_name": "x.jpg", "is_normal": False},
}


def test_parse_label_fields_and_bom() -> None:
    fields = parse_label(b"\xef\xbb\xbf" + orjson.dumps(LABEL))
    assert (fields.data_type, fields.battery_id, fields.group) == ("ct", 101, "ct-101")
    assert (fields.label, fields.swelling) == (1, False)
    assert fields.defect_types == ("porosity", "resin overflow")
    assert (fields.width, fields.height, fields.type, fields.form) == (4000, 4000, "cell", "pouch")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (orjson.dumps({**LABEL, "data_info": {"battery_ids": 1}}), "data_info.data_type"),
        (orjson.dumps({**LABEL, "data_info": {"data_type": "ct"}}), "data_info.battery_ids"),
        (orjson.dumps({**LABEL, "image_info": {"width": 1}}), "image_info.is_normal"),
        (orjson.dumps({**LABEL, "image_info": {"is_normal": "yes"}}), "image_info.is_normal"),
    ],
)
def test_parse_label_rejects_with_reason(raw: bytes, message: str) -> None:
    with pytest.raises(BadLabel, match=message):
        parse_label(raw)


def test_swelling_only_label_is_a_defect() -> None:
    label = {**LABEL, "defects": None, "swelling": {"swelling": True}}
    fields = parse_label(orjson.dumps(label))
    assert (fields.label, fields.defect_types, fields.swelling) == (1, (), True)


def test_safe_key() -> None:
    assert safe_key("CT_cell_pouch_101_x_006") == "CT_cell_pouch_101_x_006"
    for stem in ("RGB_배터리_0003_001", "a.b", "x" * 81, "with space"):
        key = safe_key(stem)
        assert SAFE_KEY.fullmatch(key) and key == safe_key(stem)
    assert safe_key("a b") != safe_key("a_b") != safe_key("a.b")


def test_parse_ratios_and_sizes() -> None:
    assert parse_ratios("70/10/20") == pytest.approx((0.7, 0.1, 0.2))
    assert parse_ratios("0.8/0/0.2") == pytest.approx((0.8, 0.0, 0.2))
    for bad in ("70/30", "a/b/c", "0/0/0", "-1/1/1"):
        with pytest.raises(ValueError):
            parse_ratios(bad)
    assert parse_size("1GiB") == 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("4096") == 4096


def groups(n_defect: int, n_normal: int, data_type: str = "ct") -> list[tuple[str, Stratum]]:
    return [(f"{data_type}-{i}", Stratum(data_type, int(i < n_defect)))
            for i in range(n_defect + n_normal)]


def test_split_ratio_stratification_and_determinism() -> None:
    batteries = groups(30, 70) + groups(10, 90, "rgb")
    first = assign_splits(batteries, (0.7, 0.1, 0.2), seed=0)
    assert first == assign_splits(list(reversed(batteries)), (0.7, 0.1, 0.2), seed=0)
    assert first != assign_splits(batteries, (0.7, 0.1, 0.2), seed=1)
    for data_type, n_defect in (("ct", 30), ("rgb", 10)):
        mine = [(g, stratum) for g, stratum in batteries if stratum.balance == data_type]
        counts = Counter(first[g] for g, _ in mine)
        assert counts == {"train": 70, "val": 10, "test": 20}
        defect = Counter(first[g] for g, stratum in mine if stratum.rank)
        expected = {"train": 0.7 * n_defect, "val": 0.1 * n_defect, "test": 0.2 * n_defect}
        assert all(abs(defect[s] - expected[s]) <= 1 for s in expected)


def test_split_small_and_empty() -> None:
    small = assign_splits(groups(3, 5), (0.7, 0.1, 0.2), seed=0)
    assert Counter(small.values()) in ({"train": 6, "val": 1, "test": 1},
                                       {"train": 5, "val": 1, "test": 2})
    no_val = assign_splits(groups(10, 40), (0.8, 0.0, 0.2), seed=0)
    assert Counter(no_val.values()) == {"train": 40, "test": 10}


ARCHIVE = Archive("images.zip", "zip")


def sample(battery: int, index: int, image_size: int, data_type: str = "ct",
           ext: str = "jpg") -> Sample:
    fields = BatteryFields(data_type, battery, True, "cell", "pouch", False, (), 8, 8, 0,
                           f"{data_type}-{battery}")
    key = f"{data_type.upper()}_cell_pouch_{battery:03d}_x_{index:03d}"
    image = Member(ARCHIVE, f"{key}.{ext}", 0, image_size, image_size, 0, 0, 0, len(key) + 4)
    label = Member(ARCHIVE, f"{key}.json", 0, 100, 100, 0, 0, 0, len(key) + 5)
    table = MemberTable.from_members(ARCHIVE, [image, label])
    return Sample(key, table, 0, table, 1, image_size, 100, ext, fields)


def test_plan_keeps_batteries_whole_and_respects_the_limit() -> None:
    one = planned_sample_bytes(sample(1, 0, 1000))
    limit = TAR_END_SIZE + 5 * one
    samples = [sample(b, i, 1000) for b, n in ((1, 3), (2, 3), (3, 13), (4, 2)) for i in range(n)]
    samples.append(sample(5, 0, 50_000))
    shards = plan_shards(reversed(samples), {f"ct-{b}": "train" for b in range(1, 6)}, limit,
                         get_profile(), ShardSizes(planned_sample_bytes, TAR_END_SIZE, source_ext),
                         shard_name)
    contents = [[(s.fields.battery_id, s.key) for s in shard.samples] for shard in shards]
    assert [key for shard in contents for key in shard] == sorted((s.fields.battery_id, s.key)
                                                                  for s in samples)
    batteries = [sorted({b for b, _ in shard}) for shard in contents]
    # battery 2 does not fit beside 1, battery 3 (too big) fills shards, 4 fits after it
    assert batteries == [[1], [2, 3], [3], [3], [3, 4], [5]]
    for shard in shards[:-1]:
        assert shard.expected_bytes <= limit
    assert shards[-1].expected_bytes > limit and len(shards[-1].samples) == 1
    assert [s.name for s in shards] == [f"train/shard-{i:06d}.tar" for i in range(6)]


def test_a_shard_holds_one_data_type_and_one_image_format() -> None:
    """CT and RGB, JPEG and PNG (a battery holding both) are cut apart: every shard has one
    kind, each kind keeps its batteries in order, and shard numbers run on across kinds."""
    one = planned_sample_bytes(sample(1, 0, 1000))
    samples = [sample(1, i, 1000) for i in range(3)] + [sample(1, 3, 1000, ext="png")]
    samples += [sample(2, i, 1000, "rgb", "png") for i in range(2)] + [sample(3, 0, 1000)]
    shards = plan_shards(samples, {"ct-1": "train", "ct-3": "train", "rgb-2": "train"},
                         TAR_END_SIZE + 10 * one, get_profile(),
                         ShardSizes(planned_sample_bytes, TAR_END_SIZE, source_ext), shard_name)
    kinds = [{(s.fields.data_type, s.image_ext) for s in shard.samples} for shard in shards]
    assert kinds == [{("ct", "jpg")}, {("ct", "png")}, {("rgb", "png")}]
    assert [s.key for s in shards[0].samples] == sorted(
        s.key for s in samples if s.image_ext == "jpg")
    assert [s.name for s in shards] == [f"train/shard-{i:06d}.tar" for i in range(3)]
    webp = plan_shards(samples, {"ct-1": "train", "ct-3": "train", "rgb-2": "train"},
                       TAR_END_SIZE + 10 * one, get_profile(),
                       ShardSizes(planned_sample_bytes, TAR_END_SIZE, lambda s: "webp"),
                       shard_name)
    assert [len(shard.samples) for shard in webp] == [5, 2]  # one format: CT, then RGB


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, "JPEG")
    return out.getvalue()


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, "PNG")
    return out.getvalue()


def test_image_structure_check() -> None:
    assert image_problem(jpeg(), "jpg") is None
    assert image_problem(png(), "png") is None
    assert "cut off" in image_problem(jpeg()[: len(jpeg()) // 2], "jpg")
    assert "cut off" in image_problem(png()[:-12], "png")
    assert "not a JPEG" in image_problem(png(), "jpg")
    assert "not a PNG" in image_problem(b"<html>403</html>", "png")
    assert "cut off" in image_problem(jpeg()[:20], "jpg")


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "--out", "x"],
        ["convert", "{missing}", "--out", "{out}"],
        ["convert", "{empty}", "--out", "{out}"],
        ["convert", "{empty}", "--out", "{out}", "--split", "70/30"],
        ["convert", "{empty}", "--out", "{out}", "--shard-size", "huge"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "out": tmp_path / "o"}
    argv = [a.format(**paths) for a in args]
    with pytest.raises(SystemExit) as stop:
        sys.exit(main(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("shardify: error:") or err[-1].startswith("shardify")


def test_out_folder_safety(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["convert", str(source), "--out", str(foreign), "--quiet"]) == 2
    assert main(["convert", str(source), "--out", str(source / "out"), "--quiet"]) == 2
    assert (foreign / "keep.txt").read_text() == "mine"
    assert not (source / "out").exists()
    assert "not a shardify output" in capsys.readouterr().err


def test_python_dash_m_and_help() -> None:
    done = subprocess.run([sys.executable, "-m", "shardify", "convert", "--help"],
                          capture_output=True, text=True, check=True)
    for text in ("--shard-size", "--split", "--seed", "--strict", "--manifest", "exit codes"):
        assert text in done.stdout


def test_zips_without_images_or_labels_exit_2(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    with zipfile.ZipFile(source / "notes.zip", "w") as zf:
        zf.writestr("readme.txt", "nothing to convert")
    (source / "broken.zip").write_text("<html>expired</html>")
    assert main(["convert", str(source), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no images" in err and "1 unreadable" in err and "broken.zip" in err
    assert not (tmp_path / "out").exists()


def test_ustar_header_is_what_tarfile_writes() -> None:
    """The fast header builder gives tarfile's own USTAR bytes for any name and size."""
    import random
    import tarfile

    from shardify.write.tar import ustar_header

    rng = random.Random(0)
    for _ in range(2000):
        name = "".join(rng.choice("abcXYZ09_-.") for _ in range(rng.randint(1, 99)))
        size = rng.choice([0, 1, 511, 512, 513, rng.randint(0, 8**11 - 1)])
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "", ""
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
    with pytest.raises(ValueError):
        ustar_header("x" * 100, 1)
    with pytest.raises(ValueError):
        ustar_header("é.jpg", 1)


@pytest.mark.parametrize(
    ("battery_ids", "expected"),
    [(101, 101), (101.0, 101), ("101", 101), ([7], 7), (-5, None), ("²", None),
     (2**63 + 5, None), (1.5, None), (True, None)],
)
def test_battery_ids_forms(battery_ids: object, expected: int | None) -> None:
    """Plausible spellings are accepted; anything that cannot be an int64 id is a bad label."""
    label = {**LABEL, "data_info": {**LABEL["data_info"], "battery_ids": battery_ids}}
    if expected is None:
        with pytest.raises(BadLabel, match="battery"):
            parse_label(orjson.dumps(label))
    else:
        assert parse_label(orjson.dumps(label)).battery_id == expected


def test_values_the_manifest_cannot_hold_are_dropped_not_fatal() -> None:
    label = {**LABEL, "swelling": {"swelling": "yes"},
             "image_info": {**LABEL["image_info"], "width": 2**40, "is_normal": 1}}
    fields = parse_label(orjson.dumps(label))
    assert (fields.swelling, fields.width, fields.is_normal) == (None, None, True)
    with pytest.raises(BadLabel, match="true/false"):
        parse_label(orjson.dumps({**LABEL, "image_info": {"is_normal": 1.0}}))


def test_manifest_path_that_is_a_folder_is_refused_before_work(
        dataset: SynthResult, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(dataset.root), "--out", str(out), "--manifest", str(tmp_path),
                 "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not out.exists()


def pair_source(folder: Path, pairs: dict[str, tuple[bytes, bytes]]) -> Path:
    """A SOURCE folder with one zip of images and one of labels: stem -> (image, label JSON)."""
    import zipfile

    folder.mkdir()
    with zipfile.ZipFile(folder / "images.zip", "w") as images, \
            zipfile.ZipFile(folder / "labels.zip", "w") as labels:
        for name, (image, label) in pairs.items():
            images.writestr(name, image)
            labels.writestr(f"{name.rsplit('.', 1)[0]}.json", label)
    return folder


def labelled(battery_ids: object) -> bytes:
    return orjson.dumps({**LABEL, "data_info": {**LABEL["data_info"], "battery_ids": battery_ids}})


def rejected(out: Path) -> dict[str, tuple[str, str]]:
    """source_member -> (reason, detail), read back with pyarrow."""
    import pyarrow.parquet as pq

    return {row["source_member"]: (row["reason"], row["detail"])
            for row in pq.read_table(out / "rejects.parquet").to_pylist()}


def test_deeply_nested_battery_ids_are_a_bad_label_in_convert_and_scan(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    deep = labelled(0).replace(b'"battery_ids":0', b'"battery_ids":' + b"[" * 1000 + b"7"
                               + b"]" * 1000)  # orjson cannot write it: spelled out
    deep_normal = labelled(7).replace(b'"is_normal":false', b'"is_normal":' + b"[" * 1000
                                      + b"]" * 1000)
    source = pair_source(tmp_path / "src", {"CT_good_001.png": (png(), labelled(7)),
                                            "CT_deep_001.png": (png(), deep),
                                            "CT_twice_001.png": (png(), labelled([[7]])),
                                            "CT_normal_001.png": (png(), deep_normal)})
    assert main(["scan", str(source), "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert (report["pairs"], report["problems"]) == (1, {"bad-label": 6})
    out = tmp_path / "out"
    assert main(["convert", str(source), "--out", str(out), "--quiet"]) == 0
    rows = rejected(out)
    for stem in ("CT_deep_001", "CT_twice_001"):
        reason, detail = rows[f"{stem}.json"]
        assert reason == "bad-label" and "data_info.battery_ids is not a battery number" in detail
    reason, detail = rows["CT_normal_001.json"]
    assert reason == "bad-label" and "image_info.is_normal is not true/false" in detail
    assert main(["verify", str(out)]) == 0


def test_damaged_png_structure_is_a_bad_image() -> None:
    good = png()
    ihdr_end = 8 + 8 + 13 + 4
    iend = good[-12:]
    cases = {
        b"\x89PNG\r\n\x1a\nIEND": "cut off",
        good[:8] + iend: "IHDR",
        good[:ihdr_end] + iend + good[ihdr_end:-12] + iend: "IDAT",
        good[:-12] + iend + good[ihdr_end:]: "chunks after its IEND",
        good[:-12] + iend[:6]: "cut off",
        good[:ihdr_end] + good[ihdr_end:ihdr_end + 4] + b"ID": "cut off",
        good[:-12]: "cut off",
        good[:8] + (12).to_bytes(4, "big") + good[12:]: "IHDR",
        good[:ihdr_end] + (2**31 - 1).to_bytes(4, "big") + good[ihdr_end + 4:]: "cut off",
    }
    for data, message in cases.items():
        problem = image_problem(data, "png")
        assert problem is not None and message in problem, (data[:40], problem)
    assert image_problem(good + b"\0" * 3, "png") is None  # padding after IEND, as before
    assert image_problem(good[:8] + good[-12:], "png") == "PNG does not start with an IHDR chunk" \
        " of 13 bytes"
    assert image_problem(good[:ihdr_end] + iend, "png") == "PNG has no IDAT chunk before IEND"


def test_png_with_iend_only_is_rejected_in_convert(tmp_path: Path) -> None:
    source = pair_source(tmp_path / "src", {"CT_good_001.png": (png(), labelled(7)),
                                            "CT_fake_001.png": (b"\x89PNG\r\n\x1a\nIEND",
                                                                labelled(7))})
    out = tmp_path / "out"
    assert main(["convert", str(source), "--out", str(out), "--quiet"]) == 0
    reason, detail = rejected(out)["CT_fake_001.png"]
    assert reason == "bad-image" and "PNG" in detail
    assert main(["verify", str(out)]) == 0


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_manifest_path_that_would_replace_anything_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--manifest never replaces a source, a device, a file in OUT (which the run writes) or a
    file shardify did not write; nothing is created inside a SOURCE folder. Each refusal: exit
    2, one line, no OUT."""
    import os
    import stat

    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pair_source(tmp_path / "src", {"CT_good_001.png": (png(), labelled(7))})
    before = tree_bytes(source)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    pq.write_table(pa.table({"a": [1]}), elsewhere / "foreign.parquet")
    (elsewhere / "kept.summary.json").write_text('{"mine": true}')
    (elsewhere / "to_source.zip").symlink_to(source / "labels.zip")
    (elsewhere / "source_link").symlink_to(source)
    (elsewhere / "loop.parquet").symlink_to(elsewhere / "loop.parquet")
    inside = {source / "new.parquet": "inside the source folder",
              elsewhere / "source_link" / "new.parquet": "inside the source folder"}
    refused = {
        source / "labels.zip": "sources are only ever read",
        elsewhere / "to_source.zip": "sources are only ever read",
        elsewhere / "notes.txt": "not a manifest shardify wrote",
        elsewhere / "foreign.parquet": "not a manifest shardify wrote",
        elsewhere / "kept.parquet": "kept.summary.json",
        elsewhere / "loop.parquet": "symbolic links",
        Path("/dev/null"): "not a regular file",
        Path("/dev/full"): "not a regular file",
        tmp_path / "out" / "train" / "shard-000000.tar": "inside --out",
        tmp_path / "out" / "rejects.parquet": "inside --out",
    }
    out = tmp_path / "out"
    # SOURCE as a folder, then as files (a new file beside a SOURCE file replaces nothing).
    for given_source, cases in ((source, {**inside, **refused}), (source / "labels.zip", refused)):
        for manifest, message in cases.items():
            capsys.readouterr()
            assert main(["convert", str(given_source), str(source / "images.zip"), "--out",
                         str(out), "--manifest", str(manifest), "--quiet"]) == 2, manifest
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 1 and err[0].startswith("shardify: error: --manifest"), err
            assert message in err[0], err
            assert not out.exists()
    assert main(["convert", str(source), "--out", str(out), "--manifest",
                 str(source / "labels.zip"), "--quiet"]) == 2
    assert tree_bytes(source) == before
    assert (elsewhere / "notes.txt").read_text() == "mine"
    assert (elsewhere / "kept.summary.json").read_text() == '{"mine": true}'
    assert pq.read_table(elsewhere / "foreign.parquet").column_names == ["a"]
    assert all(stat.S_ISCHR(os.stat(device).st_mode) for device in ("/dev/null", "/dev/full"))
    # A manifest shardify wrote is replaced by a re-run, and so is its summary.
    manifest = elsewhere / "m.parquet"
    for _ in range(2):
        assert main(["convert", str(source), "--out", str(out), "--manifest", str(manifest),
                     "--quiet"]) == 0
        assert manifest.read_bytes() == (out / "manifest.parquet").read_bytes()
        assert (elsewhere / "m.summary.json").read_bytes() == (out / "summary.json").read_bytes()
    assert tree_bytes(source) == before
