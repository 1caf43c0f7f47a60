"""verify names each kind of damage; report's numbers equal counts computed from the manifest."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import converted_copy, manifest_rows

from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult, synthesize


@pytest.fixture(scope="module")
def converted(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_copy(dataset.root, tmp_path_factory, "run", "--shard-size", "64KiB")


def damaged_copy(converted: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    return copy


def verify(out: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", str(out), *extra])
    return code, capsys.readouterr().out


def test_clean_output_passes_also_against_sources(dataset: SynthResult, converted: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert verify(converted, capsys) == (0, f"verify: OK: {dataset.samples} samples in "
                                            f"{converted} match their manifest\n")
    code, printed = verify(converted, capsys, "--sources", str(dataset.root))
    assert code == 0 and "and their sources" in printed


def test_flipped_byte_truncation_and_missing_shard(converted: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = damaged_copy(converted, tmp_path)
    first, *_ = manifest_rows(out)
    shard = out / first["shard"]
    data = bytearray(shard.read_bytes())
    data[first["offset"] + 512 + 100] ^= 0x55
    shard.write_bytes(bytes(data))
    by_shard = Counter(r["shard"] for r in manifest_rows(out))
    cut_name = next(name for name in sorted(by_shard) if name != first["shard"]
                    and by_shard[name] > 1)
    cut = out / cut_name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    gone_name = next(name for name in sorted(by_shard) if name not in (first["shard"], cut_name))
    (out / gone_name).unlink()
    code, printed = verify(out, capsys)
    assert code == 1 and printed.startswith("verify: FAILED")
    assert f"{first['shard']}:{first['key']}: image crc32 differs from the manifest" in printed
    assert f"{gone_name}: shard file is missing" in printed
    lost = [r["key"] for r in manifest_rows(out) if r["shard"] == cut_name][-1]
    assert f"{cut_name}:{lost}: in the manifest but not in the shard" in printed


def test_extra_shard_and_stray_sample(converted: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    out = damaged_copy(converted, tmp_path)
    shutil.copy(out / "train" / "shard-000000.tar", out / "train" / "shard-000999.tar")
    first = manifest_rows(out)[0]
    shard = out / first["shard"]
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    stray = tarfile.TarInfo("stray_key.cls")
    stray.size = 1
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload))
        tar.addfile(stray, io.BytesIO(b"0"))
    code, printed = verify(out, capsys)
    assert code == 1
    assert "train/shard-000999.tar: extra shard file not in summary.json" in printed
    assert f"{first['shard']}:stray_key: sample in the shard is not in the manifest" in printed


def test_battery_moved_into_another_split_is_leakage(converted: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A sample moved (shard and manifest, consistently) into another split's shard: only the
    leakage of its battery remains to be found, and verify finds it."""
    out = damaged_copy(converted, tmp_path)
    table = manifest_rows(out)
    victim = next(r for r in table if r["split"] == "train")
    target = next(r["shard"] for r in table if r["split"] == "test")
    shards = {name: _members(out / name) for name in {victim["shard"], target}}
    moved = [m for m in shards[victim["shard"]] if m[0].name.split(".")[0] == victim["key"]]
    shards[victim["shard"]] = [m for m in shards[victim["shard"]] if m not in moved]
    shards[target] += moved
    offsets = {name: _write_members(out / name, members) for name, members in shards.items()}
    for row in table:
        if row["key"] == victim["key"]:
            row["split"], row["shard"] = "test", target
        if row["shard"] in offsets:
            row["offset"] = offsets[row["shard"]][row["key"]]
    schema = pq.read_schema(out / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(table, schema=schema), out / "manifest.parquet")
    summary = json.loads((out / "summary.json").read_text())
    summary["splits"]["train"]["samples"] -= 1
    summary["splits"]["test"]["samples"] += 1
    (out / "summary.json").write_text(json.dumps(summary))
    code, printed = verify(out, capsys)
    assert code == 1
    assert printed.splitlines()[1:] == [
        f"battery {victim['group']}: appears in several splits: ['test', 'train']"]


def _members(shard: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(shard) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]


def _write_members(shard: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> dict[str, int]:
    """Rewrite a shard as USTAR; return each sample's first header offset."""
    offsets: dict[str, int] = {}
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            offsets.setdefault(info.name.split(".")[0], tar.offset)
            tar.addfile(info, io.BytesIO(payload))
    return offsets


def test_sources_that_differ_are_named(dataset: SynthResult, converted: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    """Against a copy of the sources whose images were all regenerated with another seed."""
    other = synthesize(tmp_path / "other", seed=1)
    code, printed = verify(converted, capsys, "--sources", str(other.root))
    assert code == 1
    assert "image differs from its source member" in printed


def test_report_numbers_equal_manifest_counts(converted: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    table = manifest_rows(converted)
    capsys.readouterr()
    page = tmp_path / "report.html"
    assert main(["report", str(converted), "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    for split in ("train", "val", "test"):
        mine = [r for r in table if r["split"] == split]
        defect = sum(r["label"] for r in mine)
        batteries = len({r["group"] for r in mine})
        line = next(line for line in printed.splitlines() if line.startswith(f"{split} "))
        assert line.split()[1:5] == [str(len(mine)), str(batteries), str(len(mine) - defect),
                                     str(defect)]
        names = Counter(n.lower() for r in mine for n in r["defect_types"])
        for name, count in names.items():
            assert f"{name} {count}" in printed
    html = page.read_text()
    assert html.count('<img class="plot"') == 4
    for title in ("Class balance per split", "Defect types per split", "Samples per battery",
                  "Image sizes"):
        assert f"<h2>{title}</h2>" in html


def test_report_renders_in_a_browser(converted: Path, tmp_path: Path) -> None:
    """The page renders in headless Chromium (skipped where no Chromium is installed)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless Chromium on this machine")
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    assert main(["report", str(converted), "--html", str(page)]) == 0
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1000,2400", page.as_uri()], check=True, timeout=60,
                   capture_output=True)
    assert shot.stat().st_size > 20_000


def rewrite_manifest(out: Path, table: list[dict]) -> None:
    schema = pq.read_schema(out / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(table, schema=schema), out / "manifest.parquet")


def member_infos(shard: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return {info.name: info for info in tar.getmembers()}


def edit(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def test_sample_bytes_label_padding_and_end_blocks(converted: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Damage that leaves every image intact, each in its own shard: all four are named."""
    out = damaged_copy(converted, tmp_path)
    table = manifest_rows(out)
    firsts = {}
    for row in table:
        firsts.setdefault(row["shard"], row)
    sized, labelled, padded, ended = list(firsts.values())[:4]
    sized["sample_bytes"] += 512
    rewrite_manifest(out, table)
    label = member_infos(out / labelled["shard"])[f"{labelled['key']}.json"]
    raw = (out / labelled["shard"]).read_bytes()[label.offset_data : label.offset_data + label.size]
    at = raw.index(b'"application":"') + len(b'"application":"')
    edit(out / labelled["shard"], label.offset_data + at, bytes([raw[at] ^ 0x20]))  # E -> e
    cls = member_infos(out / padded["shard"])[f"{padded['key']}.cls"]
    edit(out / padded["shard"], cls.offset_data + 1 + 200, b"\x01")
    end = out / ended["shard"]
    end.write_bytes(end.read_bytes()[:-1024])
    code, printed = verify(out, capsys)
    assert code == 1
    assert sorted(printed.splitlines()[1:]) == sorted([
        f"{sized['shard']}:{sized['key']}: sample takes {sized['sample_bytes'] - 512} bytes in "
        f"the shard, manifest says {sized['sample_bytes']}",
        f"{labelled['shard']}:{labelled['key']}: label crc32 differs from the manifest",
        f"{padded['shard']}:{padded['key']}: padding after {padded['key']}.cls is not zeros",
        f"{ended['shard']}: the two zero blocks that end a tar are missing",
    ])


def test_damaged_tar_header_is_named_once(converted: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    out = damaged_copy(converted, tmp_path)
    by_shard = Counter(r["shard"] for r in manifest_rows(out))
    name = max(by_shard, key=lambda shard: by_shard[shard])
    mine = [r for r in manifest_rows(out) if r["shard"] == name]
    victim = mine[1]
    edit(out / name, victim["offset"] + 3, b"\x7f")
    code, printed = verify(out, capsys)
    assert code == 1
    assert printed.splitlines()[1:] == [
        f"{name}: damaged tar header at offset {victim['offset']}; the {len(mine) - 1} samples "
        "from there on could not be read"]


def test_data_after_the_end_blocks_is_named(converted: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = damaged_copy(converted, tmp_path)
    name = manifest_rows(out)[0]["shard"]
    size = (out / name).stat().st_size
    with open(out / name, "ab") as shard:
        shard.write(bytes(700) + b"junk")
    code, printed = verify(out, capsys)
    assert code == 1
    assert printed.splitlines()[1:] == [
        f"{name}: 704 bytes after the end of the tar (offset {size}) are not all zeros"]


def test_damaged_manifest_exits_1_and_no_output_exits_2(converted: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = damaged_copy(converted, tmp_path)
    (out / "manifest.parquet").write_bytes(b"PAR1 not really PAR1")
    code, printed = verify(out, capsys)
    assert code == 1 and "manifest.parquet: unreadable:" in printed
    pq.write_table(pq.read_table(converted / "manifest.parquet").drop_columns(["label_crc32"]),
                   out / "manifest.parquet")
    code, printed = verify(out, capsys)
    assert code == 1 and "manifest.parquet: lacks the columns ['label_crc32']" in printed
    (out / "manifest.parquet").unlink()
    code, printed = verify(out, capsys)
    assert code == 1 and "manifest.parquet: missing" in printed
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    assert "is it a shardify output?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["verify", "report"])
def test_unreadable_or_older_manifests_end_with_their_exit_code(
        converted: Path, tmp_path: Path, command: str) -> None:
    """In a process of its own (as users run it), a damaged manifest is exit 1 for verify and a
    one-line exit 2 for report, never an abort; a manifest of an older build (no metadata, no
    label_crc32) is read with the battery rules: report works, verify names the missing column.
    """
    out = damaged_copy(converted, tmp_path)
    (out / "manifest.parquet").write_bytes(b"PAR1 not really PAR1")
    for _ in range(3):  # Arrow's read-ahead threads aborted such runs at exit, now and then
        done = subprocess.run([sys.executable, "-m", "shardify", command, str(out)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == (1 if command == "verify" else 2), done.stderr
        assert "Traceback" not in done.stderr and "terminate called" not in done.stderr
    older = pq.read_table(converted / "manifest.parquet").drop_columns(["label_crc32"])
    pq.write_table(older.replace_schema_metadata(None), out / "manifest.parquet")
    done = subprocess.run([sys.executable, "-m", "shardify", command, str(out)],
                          capture_output=True, text=True, timeout=60)
    if command == "verify":
        assert done.returncode == 1 and "lacks the columns ['label_crc32']" in done.stdout
    else:
        assert done.returncode == 0 and "samples per battery" in done.stdout


def test_damaged_first_header_is_named_once(converted: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = damaged_copy(converted, tmp_path)
    name = manifest_rows(out)[0]["shard"]
    edit(out / name, 3, b"\x7f")
    code, printed = verify(out, capsys)
    count = sum(r["shard"] == name for r in manifest_rows(out))
    assert (code, printed.splitlines()[1:]) == (1, [
        f"{name}: damaged tar header at offset 0; the {count} samples from there on could not "
        "be read"])


def test_a_sample_or_shard_listed_twice_is_named(converted: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """What a resume that planned a shard twice would write: verify must not pass it."""
    copy = damaged_copy(converted, tmp_path)
    rows = pq.read_table(copy / "manifest.parquet").to_pylist()
    rewrite_manifest(copy, [*rows, rows[0]])
    summary = json.loads((copy / "summary.json").read_bytes())
    summary["splits"]["train"]["shards"].append(summary["splits"]["train"]["shards"][0])
    summary["splits"]["train"]["samples"] += 1
    (copy / "summary.json").write_bytes(json.dumps(summary).encode())
    code, printed = verify(copy, capsys)
    assert code == 1
    assert f"manifest: {rows[0]['key']}: key appears 2 times" in printed
    assert f"{rows[0]['shard']}: listed more than once in summary.json" in printed
