"""A contract test per seam: what the rest of shardify relies on from each, checked on its one
implementation (archives on disk, the battery profile, the local output store, the executors).

Each test reads back with an independent reader (zipfile, PIL, pyarrow, tarfile) where bytes
are involved.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deflate
import orjson
import pyarrow as pa
import pytest
from helpers import source_ext
from PIL import Image

from shardify.archives.discovery import find_archives
from shardify.archives.model import MEMBER_COLUMNS, Archive, Member, MemberTable
from shardify.archives.reader import ArchiveReader
from shardify.archives.zipdir import list_members
from shardify.errors import UsageError
from shardify.output.store import (
    JOURNAL_FILE,
    MANIFEST,
    STATE_DIR,
    OutputStore,
    RunRecord,
    shard_name,
    staging_path,
    tail_crc32,
)
from shardify.plan.shards import ShardSizes, plan_shards
from shardify.plan.split import assign_splits, group_strata
from shardify.profiles import DatasetProfile, Fields
from shardify.profiles.battery.sample import SynthResult
from shardify.profiles.load import get_profile
from shardify.rejects import Reason
from shardify.scan import survey
from shardify.transform.options import TransformOptions
from shardify.transform.sample import transform_sample
from shardify.write.executor import Inline, local_executor, write_shards
from shardify.write.shard import ShardJob, probe_sizes, shard_job
from shardify.write.tar import TAR_END_SIZE, planned_sample_bytes

PROFILE = get_profile()


def zips(dataset: SynthResult) -> list[Path]:
    return sorted(dataset.root.rglob("*.zip"))


def members(dataset: SynthResult, *extensions: str) -> Iterator[tuple[str, bytes]]:
    """The sample data's members with these extensions, read with zipfile: (stem, bytes);
    names without the UTF-8 flag are CP949, members with a bad CRC (planted) are left out."""
    for path in zips(dataset):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename if info.flag_bits & 0x800 else \
                    info.filename.encode("cp437").decode("cp949")
                base = name.rsplit("/", 1)[-1]
                if base.lower().endswith(extensions) and not base.startswith("._"):
                    try:
                        yield base.rsplit(".", 1)[0], archive.read(info)
                    except zipfile.BadZipFile:
                        continue


def labels(dataset: SynthResult) -> Iterator[tuple[str, bytes]]:
    return members(dataset, ".json")


# -- archives: the member model ------------------------------------------------------------------

def test_member_tables_are_complete_and_immutable(dataset: SynthResult) -> None:
    """A listed table agrees with zipfile member by member, cannot be changed in place, and a
    table with more problems is a new table."""
    path = zips(dataset)[0]
    with ArchiveReader() as reader:
        archive, table = list_members(find_archives([str(path)]).archives[0], reader)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert len(table) == len(infos)
    for row, info in enumerate(infos):
        member = table.member(row)
        assert (member.header_offset, member.compressed_size, member.file_size, member.crc32,
                member.method) == (info.header_offset, info.compress_size, info.file_size,
                                   info.CRC, info.compress_type)
        assert Member.at(archive, member.name, table.columns[row].tolist()) == \
            member._replace(problem=None)
        assert member.location() == tuple(table.columns[row].tolist())
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.problems = {}  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        table.columns["crc32"][0] = 0
    flagged = table.with_problems({0: (Reason.BOMB, "test")})
    assert dict(table.problems) == {} and flagged.problems == {0: (Reason.BOMB, "test")}
    assert flagged.names == table.names and flagged.member(0).problem == (Reason.BOMB, "test")
    assert list(MEMBER_COLUMNS.names) == list(Member._fields[2:9])


def test_member_table_round_trip_from_members() -> None:
    """Records built one by one (recovered zips) make the same table as columns would."""
    zip_archive = Archive("x.zip", "zip")
    members = [Member(zip_archive, f"a/{i}.jpg", 100 * i, 10 + i, 20 + i, 7 * i, 8, 0, 7 + i,
                      (Reason.TRUNCATED, "cut") if i == 2 else None) for i in range(4)]
    table = MemberTable.from_members(zip_archive, members)
    assert table.members() == members
    assert table.problems == {2: (Reason.TRUNCATED, "cut")}


# -- the dataset profile -------------------------------------------------------------------------

def test_battery_profile_keeps_the_profile_contract(dataset: SynthResult) -> None:
    """Every sample label parses into fields whose group, class, order and stratum follow the
    contract; the column values fit the declared columns, which hold `group` and `label`."""
    profile: DatasetProfile = PROFILE
    assert {"group", "label"} <= set(profile.columns.names)
    parsed: list[tuple[str, Fields]] = []
    for stem, raw in labels(dataset):
        try:
            parsed.append((stem, profile.parse_label(raw)))
        except ValueError:
            continue  # the planted bad labels
    assert len(parsed) >= dataset.samples
    fields = [f for _, f in parsed]
    assert all(0 <= f.label < len(profile.class_names) for f in fields)
    batch = pa.RecordBatch.from_pydict(profile.column_values(fields), schema=profile.columns)
    assert batch.column("group").to_pylist() == [f.group for f in fields]
    assert batch.column("label").to_pylist() == [f.label for f in fields]
    ordered = sorted(parsed, key=lambda item: profile.sample_order(item[1], item[0]))
    groups = [f.group for _, f in ordered]
    assert all(groups.index(g) + groups.count(g) - 1 == len(groups) - 1 - groups[::-1].index(g)
               for g in set(groups))  # each group's samples are contiguous
    by_group: dict[str, list[Fields]] = {}
    for f in fields:
        by_group.setdefault(f.group, []).append(f)
    for members in by_group.values():
        assert profile.stratum(members) == profile.stratum(members[::-1])


def _values(document: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """The values at `path` in a JSON document; "*" steps into every item of a list."""
    if not path:
        yield document
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for item in document if isinstance(document, list) else ():
            yield from _values(item, rest)
    elif isinstance(document, dict) and head in document:
        yield from _values(document[head], rest)


def test_battery_geometry_names_the_coordinates(dataset: SynthResult) -> None:
    """The declared size paths hold the image's real size (read with PIL), and every declared
    point list present is a flat list of coordinates inside the image: a polygon, but for the
    odd-length and too short lists the sample data plants (and counts) on purpose."""
    images = dict(members(dataset, ".jpg", ".jpeg", ".png"))
    geometry, checked, odd, short = PROFILE.geometry, 0, 0, 0
    for stem, raw in labels(dataset):
        try:
            document = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))
        except orjson.JSONDecodeError:
            continue
        if stem not in images or not isinstance(document, dict):
            continue
        try:
            size = Image.open(io.BytesIO(images[stem])).size
        except OSError:
            continue  # the planted bad images
        width, height = (next(_values(document, path), None) for path in geometry.size)
        assert (width, height) == size
        for path in geometry.point_lists:
            for points in _values(document, path):
                if points is None:
                    continue
                assert all(0 <= x <= width for x in points[0::2])
                assert all(0 <= y <= height for y in points[1::2])
                if len(points) % 2:
                    odd += 1
                elif len(points) < 6:
                    short += 1
                else:
                    checked += 1
    assert odd == dataset.odd_point_lists and short >= 1
    # Outlines on every label that has a usable one, defect polygons on some.
    assert checked > dataset.samples - dataset.no_outline


def test_unknown_profile_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown dataset profile 'bees'"):
        get_profile("bees")


# -- the output store ----------------------------------------------------------------------------

def test_store_publishes_whole_files_and_journals_what_is_intact(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out")
    name = shard_name("train", 0)
    fd = store.create_staged_shard(name)
    os.write(fd, b"x" * 3000)
    os.close(fd)
    assert not store.path(name).exists() and staging_path(store.path(name)).is_file()
    store.publish_shard(name)
    assert store.path(name).read_bytes() == b"x" * 3000
    assert not staging_path(store.path(name)).exists()
    assert store.shard_files() == [name]

    store.start_run(RunRecord("abc", {"seed": 0}), keep_journal=False)
    assert store.read_run() == RunRecord("abc", {"seed": 0})
    good = {"shard": name, "bytes": 3000, "tail_crc32": tail_crc32(store.path(name))}
    store.append_journal(good)
    store.append_journal({**good, "shard": shard_name("train", 1)})  # no such file
    store.append_journal({**good, "bytes": 2999})  # size differs
    with open(store.state / JOURNAL_FILE, "ab") as journal:
        journal.write(b'{"shard": "train/shard-0')  # torn by a crash
    assert list(store.journal()) == [good]
    store.start_run(RunRecord("abc", {"seed": 0}), keep_journal=True)
    assert list(store.journal()) == [good]
    store.start_run(RunRecord("def", {"seed": 1}), keep_journal=False)
    assert list(store.journal()) == []


def test_store_removes_only_its_own_files_and_locks_out_a_second_run(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out")
    (store.root / "train").mkdir(parents=True)
    kept, dropped = store.path(shard_name("train", 0)), store.path(shard_name("train", 1))
    mine = store.root / "train" / "notes.txt"
    for path in (kept, dropped, mine, store.path(MANIFEST), staging_path(dropped)):
        path.write_bytes(b"1")
    store.prepare(keep={shard_name("train", 0)})
    assert kept.exists() and mine.exists()
    assert not dropped.exists() and not store.path(MANIFEST).exists()
    assert not staging_path(dropped).exists()
    held = store.lock()
    try:
        with pytest.raises(BlockingIOError):
            OutputStore(store.root).lock()
    finally:
        os.close(held)
    os.close(OutputStore(store.root).lock())
    assert (store.root / STATE_DIR).is_dir() and store.is_output()


# -- the executor --------------------------------------------------------------------------------

def planned_jobs(dataset: SynthResult, reader: ArchiveReader) -> list[ShardJob]:
    _, pairing = survey([str(dataset.root)], reader, PROFILE)
    split = assign_splits(group_strata(pairing.samples, PROFILE), (0.7, 0.1, 0.2), 0)
    shards = plan_shards(pairing.samples, split, 64 * 2**10, PROFILE,
                         ShardSizes(planned_sample_bytes, TAR_END_SIZE, source_ext), shard_name)
    return [shard_job(shard.name, shard.samples) for shard in shards]


def run(jobs: list[ShardJob], out: Path, workers: int, reader: ArchiveReader) -> dict[str, dict]:
    """Each job's entry, the executor writing and the store publishing."""
    store, entries = OutputStore(out), {}

    def publish(entry: dict) -> None:
        store.publish_shard(entry["shard"])
        entries[entry["shard"]] = entry

    with local_executor(workers) as pool:
        write_shards(jobs, pool or Inline(reader), store, publish)
    return entries


def test_executors_write_the_same_shards_and_entries_tell_the_truth(
        dataset: SynthResult, tmp_path: Path) -> None:
    """Inline and a forked pool give the same entries and bytes; each entry's offsets, sizes
    and CRCs are those of the tar members as tarfile reads them."""
    with ArchiveReader() as reader:
        jobs = planned_jobs(dataset, reader)
        assert len(jobs) > 2
        inline = run(jobs, tmp_path / "inline", 1, reader)
        pooled = run(jobs, tmp_path / "pool", 2, reader)
    assert inline == pooled and set(inline) == {job.name for job in jobs}
    for name, entry in inline.items():
        shard = tmp_path / "inline" / name
        assert shard.read_bytes() == (tmp_path / "pool" / name).read_bytes()
        assert entry["bytes"] == shard.stat().st_size
        with tarfile.open(shard) as tar:
            members = {info.name: (info, tar.extractfile(info).read())  # type: ignore[union-attr]
                       for info in tar}
        for key, offset, size, image_size, image_crc, label_size, label_crc in entry["samples"]:
            image = next(v for n, v in members.items() if n.startswith(f"{key}.")
                         and not n.endswith((".json", ".cls")))
            label = members[f"{key}.json"]
            assert image[0].offset == offset
            assert (len(image[1]), deflate.crc32(image[1])) == (image_size, image_crc)
            assert (len(label[1]), deflate.crc32(label[1])) == (label_size, label_crc)
            cls = members[f"{key}.cls"][0]
            assert cls.offset_data + 512 - offset == size


def test_executors_probe_transformed_sizes_alike(dataset: SynthResult) -> None:
    """A probe (transform without writing) gives the same sizes inline and in a forked pool,
    and they are the sizes of the transformed sample, read back here with PIL."""
    transform = (TransformOptions(resize=40, format="png"), PROFILE.geometry)
    with ArchiveReader() as reader:
        job = planned_jobs(dataset, reader)[0]
        job = job._replace(transform=transform)
        inline = Inline(reader).probe(job).result()
        with local_executor(2) as pool:
            assert pool is not None
            pooled = pool.probe(job).result()
        assert inline == pooled and len(inline) == len(job.keys)
        sizes = list(map(probe_sizes, inline))
        first = next(size for size in sizes if size is not None)
        index = sizes.index(first)
        image = reader.read(Member.at(job.archives[job.images[index]["archive"]], "",
                                      job.images[index].tolist()[1:], None))
    assert first[0] == len(image)
    done = transform_sample(image, b'{"image_info": {}}', job.image_exts[index], *transform)
    assert first[2] == len(done.image)
    assert max(Image.open(io.BytesIO(done.image)).size) <= 40


def test_samples_the_probe_made_are_written_as_made(dataset: SynthResult,
                                                     tmp_path: Path) -> None:
    """The writer takes a probed sample as the probe made it (no second transform): here a
    marked copy of it lands in the shard, read back with tarfile; the others are transformed
    as usual, and with the real probed sample the shard is byte-identical to one without."""
    transform = (TransformOptions(resize=40, format="png"), PROFILE.geometry)
    with ArchiveReader() as reader:
        plain = planned_jobs(dataset, reader)[0]._replace(transform=transform)
        made = Inline(reader).probe(plain).result()
        first = next(i for i, done in enumerate(made) if not isinstance(done, list))
        marked = made[first]._replace(image=b"made by the probe")
        jobs = {"plain": plain, "probed": plain._replace(made={first: made[first]}),
                "marked": plain._replace(made={first: marked})}
        shards = {}
        for name, job in jobs.items():
            run([job], tmp_path / name, 1, reader)
            shards[name] = (tmp_path / name / job.name).read_bytes()
    assert shards["probed"] == shards["plain"]
    with tarfile.open(tmp_path / "marked" / plain.name) as tar:
        written = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert written[f"{plain.keys[first]}.png"] == b"made by the probe"
    with tarfile.open(tmp_path / "plain" / plain.name) as tar:
        assert {m.name for m in tar.getmembers()} == set(written)

