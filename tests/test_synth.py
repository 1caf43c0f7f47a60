"""The synthetic dataset is the oracle for converter tests, so check it is what it claims."""

from __future__ import annotations

import dataclasses
import io
import posixpath
import zipfile
from pathlib import Path

import orjson
import pytest
from PIL import Image

from shardify.profiles.battery.sample import SynthResult, synthesize

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
JUNK_NAMES = {"Thumbs.db", "desktop.ini", ".DS_Store"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return synthesize(tmp_path_factory.mktemp("synth"))


def _zips(root: Path) -> list[Path]:
    return sorted(root.rglob("*.zip"))


def _zip(root: Path, name: str) -> Path:
    (path,) = root.rglob(name)
    return path


def _is_junk(name: str) -> bool:
    base = posixpath.basename(name)
    return (
        name.endswith("/")
        or name.startswith("__MACOSX/")
        or base.startswith("._")
        or base in JUNK_NAMES
    )


def test_deterministic(synth: SynthResult, tmp_path: Path) -> None:
    again = synthesize(tmp_path)
    first, second = _zips(synth.root), _zips(again.root)
    assert len(first) == 9
    assert [p.relative_to(synth.root) for p in first] == [p.relative_to(again.root) for p in second]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert dataclasses.replace(again, root=synth.root) == synth


def test_cp949_names_have_no_utf8_flag(synth: SynthResult) -> None:
    with zipfile.ZipFile(_zip(synth.root, "TS_CT_Datasets_images_1.zip")) as zf:
        infos = zf.infolist()
    assert infos
    for info in infos:
        assert not info.flag_bits & 0x800
        assert info.orig_filename.encode("cp437").decode("cp949").startswith("원천데이터/")
    with zipfile.ZipFile(_zip(synth.root, "TL_Exterior_Img_Datasets_label.zip")) as zf:
        names = {i.orig_filename.encode("cp437").decode("cp949") for i in zf.infolist()}
    assert "라벨링데이터/외관/RGB_배터리_0003_001.json" in names
    with zipfile.ZipFile(_zip(synth.root, "TS_Exterior_Img_Datasets_images_1.zip")) as zf:
        assert all(i.flag_bits & 0x800 for i in zf.infolist())
        assert "01.원천데이터/외관/RGB_배터리_0003_001.png" in zf.namelist()


def test_stream_zip_uses_data_descriptors(synth: SynthResult) -> None:
    with zipfile.ZipFile(_zip(synth.root, "VL_CT_Datasets_label.zip")) as zf:
        assert all(i.flag_bits & 0x08 for i in zf.infolist())
    with zipfile.ZipFile(_zip(synth.root, "TL_CT_Datasets_label.zip")) as zf:
        assert not any(i.flag_bits & 0x08 for i in zf.infolist())


def test_only_planted_images_are_broken(synth: SynthResult) -> None:
    broken = []
    for path in _zips(synth.root):
        with zipfile.ZipFile(path, metadata_encoding="cp949") as zf:
            for info in zf.infolist():
                if _is_junk(info.filename):
                    continue
                if posixpath.splitext(info.filename)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(io.BytesIO(zf.read(info))) as image:
                        image.load()
                except (OSError, zipfile.BadZipFile):
                    broken.append(info.filename)
    # Truncated JPEG, HTML named .png, and the member with a flipped byte.
    assert len(broken) == 3
    assert len(broken) == (synth.rejects["bad-image"] + synth.rejects["bad-crc"]) // 2


def test_labels_carry_planted_quirks(synth: SynthResult) -> None:
    with zipfile.ZipFile(_zip(synth.root, "VL_CT_Datasets_label.zip")) as zf:
        raw = [zf.read(i) for i in zf.infolist()]
    with_bom = [r for r in raw if r.startswith(b"\xef\xbb\xbf")]
    assert len(with_bom) == 1
    label = orjson.loads(with_bom[0][3:])
    assert label["data_info"]["data_type"] == "ct"
    assert isinstance(label["image_info"]["is_normal"], bool)


def test_every_member_is_accounted_for(synth: SynthResult) -> None:
    members = 0
    for path in _zips(synth.root):
        with zipfile.ZipFile(path) as zf:
            members += len(zf.infolist())
    accounted = (
        2 * synth.samples + sum(synth.rejects.values()) + synth.identical_duplicates + synth.ignored
    )
    assert members == accounted


def test_counts(synth: SynthResult) -> None:
    assert synth.root.name == "103.배터리 불량 이미지 데이터"
    assert synth.samples > 0
    assert synth.batteries == {"ct": 8, "rgb": 8}
    assert synth.rejects == {
        "bad-crc": 2,
        "bad-image": 4,
        "bad-label": 4,
        "duplicate": 3,
        "orphan-image": 1,
        "orphan-label": 1,
    }
    assert synth.identical_duplicates == 2
    assert synth.ignored >= 6
