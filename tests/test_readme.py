"""The README's training example runs as written against a real output folder."""

from __future__ import annotations

import re
from pathlib import Path

from shardify.cli import main
from shardify.synth import synthesize

README = Path(__file__).resolve().parents[1] / "README.md"


def test_training_example_reads_every_train_sample(tmp_path: Path) -> None:
    dataset = synthesize(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(dataset.root), "--out", str(out), "--quiet"]) == 0
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    example = example.replace('"/big/disk/battery-shards"', repr(str(out)))
    example = example.replace("    ...", "    seen.append((image.size, label, meta['image_info']))")
    namespace: dict = {"seen": []}
    exec(compile(example, "README.md", "exec"), namespace)
    train = [r for r in namespace["manifest"].to_pylist() if r["split"] == "train"]
    assert len(namespace["seen"]) == len(train) > 0
    assert sorted(label for _, label, _ in namespace["seen"]) == sorted(r["label"] for r in train)
