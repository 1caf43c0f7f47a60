"""The README's training example runs as written against a real output folder."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq

from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult

README = Path(__file__).resolve().parents[1] / "README.md"


def test_training_example_reads_every_train_sample(dataset: SynthResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(dataset.root), "--out", str(out), "--quiet"]) == 0
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                  if '"/big/disk/battery-shards"' in block]
    assert "    ..." in example
    example = example.replace('"/big/disk/battery-shards"', repr(str(out)))
    example = example.replace("    ...", "    seen.append((image.size, label, meta['key']))")
    namespace: dict = {"seen": []}
    exec(compile(example, "README.md", "exec"), namespace)
    train = [r for r in pq.read_table(out / "manifest.parquet").to_pylist()
             if r["split"] == "train"]
    assert sorted((key, label) for _, label, key in namespace["seen"]) == sorted(
        (r["key"], r["label"]) for r in train)
    assert all(size == (r["width"], r["height"]) for (size, _, key), r in zip(
        sorted(namespace["seen"], key=lambda s: s[2]), sorted(train, key=lambda r: r["key"]),
        strict=True))
