"""Ray Data from a shardify output: one row per sample, the decoded image beside its manifest row.

How samples reach Ray: the split's selected manifest rows become the dataset's blocks, one block
per shard, and `map_batches` tasks read each batch's samples with one pread per sample at the
row's `offset` (`write.tar.read_sample`; each shard opened once per batch). So only the selected
samples' bytes are read, in shard order, spread over Ray's workers, and every row already has
its manifest columns. The
alternative, `ray.data.read_webdataset` over the shards `select` needs, reads every member of
those shards (unselected samples too), gives no manifest columns without a join (a shuffle of
the whole split), and its default decoding fails on a split mixing CT and photo shards (see
README). The shards must be readable at OUT's path on every Ray node (a shared disk).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pyarrow as pa

from .output.store import OutputStore
from .rows import Select, check_decode, decode_image, selected_rows, shard_spans
from .write.tar import LABEL_EXT, read_sample

if TYPE_CHECKING:
    import ray.data

RayDecode = Literal["numpy", "raw"]
RAY_DECODES = ("numpy", "raw")


def ray_dataset(out: Path | str, split: str = "train", *, select: Select = None,
                decode: RayDecode = "numpy", batch_size: int = 64) -> ray.data.Dataset:
    """A `ray.data.Dataset` of the split's samples that match `select` (as in `open_dataset`).

    Columns: every manifest column, `image` (an HxWx3 uint8 array, RGB as in `open_dataset`, or
    the image bytes with `decode="raw"`) and `label_json` (the label JSON as text: its fields
    vary between samples, which a typed column cannot hold). `batch_size`: samples per read task
    batch. Needs Ray Data: `pip install 'shardify[ray]'`.
    """
    check_decode(decode, RAY_DECODES)
    try:
        import ray.data
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"ray_dataset needs Ray Data ({error}); "
                                  "pip install 'shardify[ray]'") from error
    rows = selected_rows(OutputStore(Path(out)), split, select)
    blocks = [rows.slice(first, end - first) for first, end in shard_spans(rows).values()]
    return ray.data.from_arrow(blocks).map_batches(
        ReadBatch(Path(out), decode), batch_format="pyarrow", batch_size=batch_size,
        zero_copy_batch=True)


class ReadBatch:
    """Manifest rows -> the same rows with their `image` and `label_json` (run in Ray tasks)."""

    def __init__(self, out: Path, decode: RayDecode) -> None:
        self.out = out
        self.decode: RayDecode = decode

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowVariableShapedTensorArray

        images, labels = [], []
        with ExitStack() as opened:
            shards: dict[str, int] = {}  # each shard of the batch opened once
            for row in batch.to_pylist():
                if row["shard"] not in shards:
                    shards[row["shard"]] = opened.enter_context(
                        open(self.out / row["shard"], "rb")).fileno()
                members = read_sample(shards[row["shard"]], row)
                images.append(decode_image(members[row["image_ext"]], self.decode))
                labels.append(members[LABEL_EXT].decode("utf-8"))
        image_column = (pa.array(images, pa.binary()) if self.decode == "raw"
                        else ArrowVariableShapedTensorArray.from_numpy(images))
        return batch.append_column("image", image_column).append_column(
            "label_json", pa.array(labels, pa.string()))
