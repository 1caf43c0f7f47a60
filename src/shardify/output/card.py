"""The dataset card, OUT/README.md: how Hugging Face `datasets` loads OUT, and what OUT is.

Its YAML header declares the splits (shard globs) and every feature, so `load_dataset(OUT)`
does not guess them from the first samples: `datasets` otherwise fails on a label field that is
null there and a number later, and leaves out an image type the first shard lacks. The label is
a struct typed from every label written (`write.label_types`; a field absent from a label loads
as None); only values whose types disagree are `Json`. The struct keeps numbers exact: `Json`
goes through pandas' ujson, which writes floats to 10 decimals and reads 7.81 as
7.8100000000000005.

A pure function of plain data; convert writes the file with the other index files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..plan.split import SPLITS
from ..profiles import DatasetProfile
from ..progress import human_bytes
from ..write.label_types import BOOL, FLOAT, INT, JSON, NULL, STR
from ..write.tar import CLASS_EXT, LABEL_EXT
from .store import MANIFEST, REJECTS, SUMMARY, shard_glob

HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # datasets' split names
MIN_JSON_DATASETS = "4.7"  # the first `datasets` with the Json feature
DTYPES = {NULL: "null", BOOL: "bool", INT: "int64", FLOAT: "float64", STR: "string",
          JSON: "json"}
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./*-]*")  # YAML scalars that need no quotes
_RESERVED = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}


def dataset_card(profile: DatasetProfile, summary: Mapping[str, Any],
                 options: Mapping[str, Any], image_exts: Iterable[str], labels: Any) -> str:
    """README.md for OUT: a YAML header `datasets` reads, then the card's text.

    `summary` is the run's summary (counts per split), `options` its shaping options,
    `image_exts` the image types written, `labels` the labels' merged type. Splits without
    samples are left out.
    """
    splits = [split for split in SPLITS if summary["splits"][split]["samples"]]
    exts = sorted(set(image_exts))
    header: dict[str, Any] = {"pretty_name": profile.card.title, "license": "other",
                              "tags": ["webdataset", "shardify"]}
    if splits:
        header["configs"] = [{"config_name": "default", "data_files": [
            {"split": HF_SPLITS[split], "path": shard_glob(split)} for split in splits]}]
        # No `splits` sizes: datasets wants their Arrow bytes, which only it knows.
        header["dataset_info"] = {"features": features(profile.class_names, exts, labels)}
    return "\n".join(["---", *_yaml(header), "---", "",
                      *_body(profile, summary, options, splits, exts, labels), ""])


def features(class_names: Sequence[str], image_exts: Sequence[str], labels: Any
             ) -> list[dict[str, Any]]:
    """The `datasets` features of a sample (their YAML form): the key and shard URL the
    webdataset builder adds, one Image per image type, the label's type, the class."""
    return [
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
        *({"name": ext, "dtype": "image"} for ext in image_exts),
        {"name": LABEL_EXT, **label_feature(labels)},
        {"name": CLASS_EXT, "dtype": {"class_label": {"names": {
            str(number): name for number, name in enumerate(class_names)}}}},
    ]


def label_feature(kind: Any) -> dict[str, Any]:
    """A label type (see `write.label_types`) as a `datasets` feature, in its YAML form: a
    struct per object (an always empty one is Json: Arrow structs need a field), a list per
    list, a dtype per scalar."""
    if isinstance(kind, dict):
        if not kind:
            return {"dtype": DTYPES[JSON]}
        return {"struct": [{"name": name, **label_feature(item)} for name, item in kind.items()]}
    if isinstance(kind, list):
        item = label_feature(kind[1])
        (form, value), = item.items()  # the short form: `list: int64`, `list: [fields]`
        return {"list": value if form in ("dtype", "struct") else item}
    return {"dtype": DTYPES[kind]}


def _body(profile: DatasetProfile, summary: Mapping[str, Any], options: Mapping[str, Any],
          splits: list[str], exts: list[str], labels: Any) -> list[str]:
    """The card's Markdown: what the data is, its terms, how it was made and loaded."""
    return [f"# {profile.card.title}", "", profile.card.about, "",
            *_contents(profile, summary, splits, exts), "",
            "## Licence and terms of use", "", profile.card.terms + " " + TERMS, "",
            "## How it was made", "", *_making(profile, summary, options), "",
            "## Loading", "", *_loading(splits, exts, labels)]


TERMS = ("Those terms are for you to read and follow: check them before you use, share or "
         "publish this data. shardify only changed the files' format; it grants no rights to "
         "the data, and its own licence covers its code, not the data.")


def _contents(profile: DatasetProfile, summary: Mapping[str, Any], splits: list[str],
              exts: list[str]) -> list[str]:
    """Samples, groups and classes per split, and what a sample and the index files are."""
    classes = profile.class_names
    rows = [f"| {HF_SPLITS[split]} ({split}/) | {counts['samples']} | "
            f"{counts[profile.group_unit]} | " + " | ".join(str(counts[name]) for name in classes)
            + f" | {len(counts['shards'])} | {human_bytes(counts['bytes'])} |"
            for split in splits for counts in [summary["splits"][split]]]
    names = ", ".join(f"{number} {name}" for number, name in enumerate(classes))
    images = " or ".join(f"`{{key}}.{ext}`" for ext in exts)
    return [
        f"| split | samples | {profile.group_unit} | {' | '.join(classes)} | shards | bytes |",
        "|---|---|---|" + "---|" * len(classes) + "---|---|", *rows, "",
        f"Each sample is three members of a tar shard: the image ({images}), its label "
        f"(`{{key}}.{LABEL_EXT}`) and its class (`{{key}}.{CLASS_EXT}`: {names}). `{MANIFEST}` "
        "lists every sample (one row each: split, shard, offset, sizes, CRC-32s, source "
        f"members; its Parquet metadata describes each column); `{REJECTS}` lists the "
        f"{sum(summary['rejects'].values())} source members that did not become a sample, "
        "and why."]


def _making(profile: DatasetProfile, summary: Mapping[str, Any], options: Mapping[str, Any]
            ) -> list[str]:
    group = profile.group_noun
    return [
        f"Converted from the source zips by shardify {summary['shardify']}, without unpacking "
        f"them, and split by {group} (no {group}'s images are in two splits). The options that "
        "decided the shards' bytes (the same options and inputs give the same bytes; "
        f"`{SUMMARY}` has the counts and the rest):", "",
        "```json", json.dumps(options, indent=2, ensure_ascii=False), "```"]


def _loading(splits: list[str], exts: list[str], labels: Any) -> list[str]:
    if not splits:
        return ["No sample was written: there is nothing to load."]
    version = (f" ({MIN_JSON_DATASETS} or later: label fields whose types differ between "
               "labels are `Json`)") if _mixed(labels) else ""
    return [
        f"With Hugging Face `datasets`{version}, from this folder:", "",
        "```python", "from datasets import load_dataset", "",
        'ds = load_dataset("path/to/this/folder")  # splits: '
        + ", ".join(HF_SPLITS[split] for split in splits),
        f'stream = load_dataset("path/to/this/folder", split="{HF_SPLITS[splits[0]]}", '
        "streaming=True)", "```", "",
        "A row has `__key__`, one column per image type ("
        + ", ".join(f"`{ext}`" for ext in exts) + ": a PIL image; None in the others), "
        f"`{LABEL_EXT}` (the label: a dict with every field any label has, None where a label "
        f"has none) and `{CLASS_EXT}` (a ClassLabel). The shards are plain WebDataset tars: "
        "`webdataset`, `shardify.open_dataset` and `wids` read them too."]


def _mixed(kind: Any) -> bool:
    """Whether a label type has a `Json` part (which older `datasets` cannot read)."""
    if isinstance(kind, dict):
        return not kind or any(map(_mixed, kind.values()))
    return _mixed(kind[1]) if isinstance(kind, list) else kind == JSON


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML lines of nested dicts, lists and scalars (enough for a card header)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines += [f"{pad}{_scalar(key)}:", *_yaml(item, indent + 2)]
            else:
                lines.append(f"{pad}{_scalar(key)}: {_scalar(item)}")
    else:
        for item in value:
            nested = _yaml(item, indent + 2) if isinstance(item, dict | list) and item \
                else [f"{pad}  {_scalar(item)}"]
            lines += [f"{pad}- {nested[0][indent + 2:]}", *nested[1:]]
    return lines


def _scalar(value: Any) -> str:
    """A YAML scalar: plain when unambiguous, else double-quoted (JSON's escapes are YAML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text, ensure_ascii=False)
