"""Hugging Face `datasets` loads a converted output through its dataset card (OUT/README.md),
and the manifest and rejects describe themselves in their Parquet metadata.

Each output is read back with `datasets` (a local folder, offline, a private cache), in memory
and streaming, and compared with the manifest and the shards read with tarfile: rows per split,
keys, every image decoded, every label, every class. Converted twice: as the sources are, and
cropped and resized with an empty validation split (which the card leaves out).
"""

from __future__ import annotations

import functools
import io
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import manifest_rows, read_shards, reject_rows, summary_of
from PIL import Image

import shardify
from shardify.cli import main
from shardify.output.card import label_feature
from shardify.profiles.battery.sample import SynthResult
from shardify.profiles.load import get_profile
from shardify.write.label_types import MAX_DEPTH, NULL, merge, value_type

HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
TRANSFORM = ("--crop", "outline", "--resize", "64", "--split", "80/0/20")


def convert(dataset: SynthResult, out: Path, *extra: str) -> Path:
    assert main(["convert", str(dataset.root), "--out", str(out), "--shard-size", "64KiB",
                 "--quiet", *extra]) == 0
    return out


CONVERTED: dict[Path, tuple[str, ...]] = {}  # each output and its extra convert options


@pytest.fixture(scope="module", params=[(), TRANSFORM], ids=["as-is", "crop-resize"])
def out(request: pytest.FixtureRequest, dataset: SynthResult,
        tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = convert(dataset, tmp_path_factory.mktemp("out") / "out", *request.param)
    CONVERTED[path] = request.param
    return path


def check_rows(rows: Iterable[dict], split: str, out: Path, class_names: list[str]) -> None:
    """The rows of one split are the manifest's, each with the shard's image, label and class."""
    expected = {row["key"]: row for row in manifest_rows(out) if row["split"] == split}
    shards = read_shards(out)
    seen = []
    for row in rows:
        key = row["__key__"]
        seen.append(key)
        wanted, members = expected[key], shards[key]
        ext = wanted["image_ext"]
        for other in ("jpg", "png"):
            assert (row.get(other) is None) == (other != ext), (key, other)
        image = Image.open(io.BytesIO(members[ext]))
        assert row[ext].mode == image.mode and row[ext].size == (wanted["width"],
                                                                 wanted["height"])
        assert np.array_equal(np.asarray(row[ext]), np.asarray(image)), key
        assert same_label(row["json"], json.loads(members["json"])), key
        assert row["cls"] == int(members["cls"]) == wanted["label"]
        assert class_names[row["cls"]] == ("normal" if wanted["is_normal"] else "defect")
    assert sorted(seen) == sorted(expected)


def same_label(loaded: Any, written: Any) -> bool:
    """Whether a label as `datasets` gives it is the label written: every value equal (nulls
    included; an int may come back as the float it equals), and a field the written label
    lacks is None (a struct has every field any label has)."""
    if isinstance(written, dict):
        return isinstance(loaded, dict) and written.keys() <= loaded.keys() and all(
            same_label(loaded[name], written.get(name)) if name in written else value is None
            for name, value in loaded.items())
    if isinstance(written, list):
        return isinstance(loaded, list) and len(loaded) == len(written) and all(
            map(same_label, loaded, written))
    return (type(loaded) is type(written) and loaded == written) or (
        isinstance(written, int) and not isinstance(written, bool)
        and isinstance(loaded, float) and loaded == written)


def card_header(out: Path) -> dict:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_declares_splits_and_features(out: Path) -> None:
    """Only splits with samples, each its shard glob; the class names; both image types."""
    summary = summary_of(out)
    header = card_header(out)
    (config,) = header["configs"]
    filled = [split for split in HF_SPLITS if summary["splits"][split]["samples"]]
    assert config["data_files"] == [{"split": HF_SPLITS[split], "path": f"{split}/shard-*.tar"}
                                    for split in filled]
    features = {f.pop("name"): f for f in header["dataset_info"]["features"]}
    label = features.pop("json")["struct"]
    assert features == {"__key__": {"dtype": "string"}, "__url__": {"dtype": "string"},
                        "jpg": {"dtype": "image"}, "png": {"dtype": "image"}, "cls": {"dtype": {
                            "class_label": {"names": {"0": "normal", "1": "defect"}}}}}
    fields = {f["name"]: f for f in label}
    # Null in CT labels, a number / a list in RGB ones; a top-level outline in some only.
    info = {f["name"]: f for f in fields["data_info"]["struct"]}
    assert info["distance"]["dtype"] == "int64" and info["degree"]["list"] == "int64"
    assert {f["name"] for f in fields["battery_outline"]["struct"]} == {"points"}
    assert [f["name"] for f in fields["defects"]["list"]] == ["id", "name", "points"]
    text = (out / "README.md").read_text()
    assert f"shardify {shardify.__version__}" in text and "AI Hub's terms of use" in text
    making = text.split("## How it was made", 1)[1]
    block = making.split("```json\n", 1)[1].split("\n```", 1)[0]
    made = json.loads(block)  # the options that decided the bytes
    assert (made["seed"], made["shard_size"], made["split"]) == (
        summary["options"]["seed"], summary["options"]["shard_size"],
        summary["options"]["ratios"])
    assert made["profile"].startswith("battery ")


def test_load_dataset_reads_every_sample(out: Path, hf_cache: str) -> None:
    import datasets

    loaded = datasets.load_dataset(str(out), cache_dir=hf_cache)
    summary = summary_of(out)
    assert set(loaded) == {HF_SPLITS[s] for s in HF_SPLITS if summary["splits"][s]["samples"]}
    for split, name in HF_SPLITS.items():
        if name in loaded:
            names = loaded[name].features["cls"].names
            assert names == list(get_profile().class_names)
            check_rows(loaded[name], split, out, names)


def test_streaming_reads_every_sample(out: Path, hf_cache: str) -> None:
    import datasets

    streams = datasets.load_dataset(str(out), streaming=True, cache_dir=hf_cache)
    for split, name in HF_SPLITS.items():
        if name in streams:
            check_rows(streams[name], split, out, streams[name].features["cls"].names)


def test_verify_accepts_an_output_with_its_card(out: Path) -> None:
    assert main(["verify", str(out)]) == 0


def test_resumed_run_writes_the_same_card(out: Path, dataset: SynthResult,
                                          tmp_path: Path) -> None:
    """The shards kept from the journal bring their labels' types: after the last train shard
    and the index files are lost, the resumed run's card is the uninterrupted run's."""
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for lost in (sorted(copy.glob("train/shard-*.tar"))[-1], copy / "README.md",
                 copy / "summary.json"):
        lost.unlink()
    convert(dataset, copy, *CONVERTED[out])
    assert (copy / "README.md").read_bytes() == (out / "README.md").read_bytes()


def test_parquet_metadata_describes_the_files(out: Path) -> None:
    """Version, profile, options, class names and a description of every column, in both."""
    summary = summary_of(out)
    options = {k: v for k, v in summary["options"].items()
               if k not in ("sources", "split", "ratios", "strict")}
    for name, rows in (("manifest.parquet", manifest_rows(out)),
                       ("rejects.parquet", reject_rows(out))):
        with open(out / name, "rb") as handle:
            schema = pq.read_schema(handle)
        meta = {key.decode(): value.decode() for key, value in schema.metadata.items()}
        assert meta["shardify"] == shardify.__version__ and meta["profile"] == "battery"
        written = json.loads(meta["options"])
        assert written["split"] == summary["options"]["ratios"]
        assert {k: written[k] for k in options} == options
        assert written["profile"] == "battery 2" and written["profile_spec"] == "battery"
        assert written["profile_options"] == {"group": "data_type+battery",
                                              "classes": "normal-defect",
                                              "normal_without_defects": "false"}
        assert json.loads(meta["class_names"]) == ["normal", "defect"]
        columns = json.loads(meta["columns"])
        assert list(columns) == schema.names == list(rows[0])
        assert all(isinstance(text, str) and text for text in columns.values())


LABELS = [  # types that disagree, nest, or are absent and null in some labels
    {"a": 1, "b": None, "c": [1, 2], "d": {"x": "s"}, "e": [], "f": 1, "g": 2**63, "h": {}},
    {"a": 7.81, "b": [{"p": 1}], "c": [0.5], "d": {"y": True}, "e": [None], "f": "one"},
    {"a": None, "b": [{"q": [1, "two"]}, None], "c": None, "f": [1], "i": [[1], [2.5]]},
]


def test_label_types_merge_over_every_label() -> None:
    """Null and absent fields join any type; int and float make float; disagreeing values, an
    integer beyond int64, an object always empty and values nested too deep are Json."""
    merged = functools.reduce(merge, map(value_type, LABELS), NULL)
    assert merged == {"a": "float", "b": ["list", {"p": "int", "q": ["list", "json"]}],
                      "c": ["list", "float"], "d": {"x": "str", "y": "bool"},
                      "e": ["list", "null"], "f": "json", "g": "json", "h": {},
                      "i": ["list", ["list", "float"]]}
    assert merge(merged, value_type(LABELS[1])) == merged  # nothing new: the same type
    deep: Any = 1
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    assert "json" in json.dumps(value_type({"deep": deep}))


def test_label_feature_loads_every_label_exactly(hf_cache: str) -> None:
    """The card's feature of those types makes datasets give back each label: its values
    (floats exact), None where a label lacks a field, the disagreeing values as written."""
    import datasets

    merged = functools.reduce(merge, map(value_type, LABELS), NULL)
    features = datasets.Features._from_yaml_list(
        [{"name": "json", **label_feature(merged)}])
    rows = datasets.Dataset.from_list([{"json": label} for label in LABELS], features=features)
    assert [same_label(row["json"], label) for row, label in zip(rows, LABELS, strict=True)] \
        == [True] * len(LABELS)
    assert rows[1]["json"]["f"] == "one" and rows[2]["json"]["b"][0]["q"] == [1, "two"]
