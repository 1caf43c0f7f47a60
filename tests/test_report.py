"""report: rejects, requested vs achieved ratios, the plots' legends and ticks, and a gallery
whose drawn polygons lie on the pixels the written labels describe."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import converted_copy, manifest_rows, read_shards, reject_rows
from matplotlib.colors import to_rgba
from PIL import Image, ImageDraw, ImageFilter

from shardify.cli import main
from shardify.profiles.battery.sample import DEFECT_COLOURS, SynthResult
from shardify.report import (
    GALLERY_PER_CLASS,
    OUTLINE_COLOUR,
    POLYGON_COLOUR,
    SPLIT_COLOURS,
    THUMBNAIL_PX,
    figures,
    load_manifest,
    report_data,
)

SPLITS = ("train", "val", "test")
CLASSES = ("normal", "defect")
THUMBNAIL = re.compile(r'<figure class="thumb" data-split="(\w+)" data-class="(\w+)" '
                       r'data-key="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,'
                       r'([^"]+)">')


@pytest.fixture(scope="module")
def plain(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample data converted as it is (its 384x384 CT JPEGs are decoded at half size)."""
    return converted_copy(dataset.root, tmp_path_factory, "plain", "--split", "60/20/20")


@pytest.fixture(scope="module")
def cropped(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cropped to the outline with a wide margin and resized: thumbnails are scaled down."""
    out = tmp_path_factory.mktemp("cropped") / "out"
    assert main(["convert", str(dataset.root), "--out", str(out), "--quiet", "--crop",
                 "outline", "--crop-margin", "100", "--resize", "300"]) == 0
    return out


def report(out: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """The printed report and the HTML page of `out`."""
    capsys.readouterr()
    page = tmp_path / "report.html"
    assert main(["report", str(out), "--html", str(page)]) == 0
    return capsys.readouterr().out, page.read_text(encoding="utf-8")


@pytest.fixture(scope="module", params=["plain", "cropped"])
def gallery_of(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, str]:
    """An output and its HTML page, made once for the gallery tests."""
    out = request.getfixturevalue(request.param)
    page = tmp_path_factory.mktemp("page") / "report.html"
    assert main(["report", str(out), "--html", str(page)]) == 0
    return out, page.read_text(encoding="utf-8")


def test_rejects_section_counts_each_planted_reason(dataset: SynthResult, plain: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    printed, page = report(plain, tmp_path, capsys)
    rows = reject_rows(plain)
    reasons = Counter(r["reason"] for r in rows)
    assert reasons == Counter(dataset.rejects)
    lines = printed.splitlines()
    at = lines.index(f"rejects: {len(rows)} in rejects.parquet, the first 10:")
    assert lines[at + 1] == "  by reason: " + ", ".join(
        f"{reason} {count}" for reason, count in sorted(reasons.items()))
    for line, row in zip(lines[at + 2 : at + 12], rows[:10], strict=True):
        assert line.split()[:2] == [row["reason"], row["key"]]
        assert f"{row['source_archive']}:{row['source_member']}  {row['detail']}" in line
    assert lines[at + 12] == ""
    for reason, count in reasons.items():
        assert f"<tr><td>{reason}</td><td>{count}</td></tr>" in page


def test_requested_and_achieved_ratios(plain: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    """Requested as given to convert (60/20/20); achieved shares of batteries and samples as
    counted in the manifest."""
    rows = manifest_rows(plain)
    batteries = {s: len({r["group"] for r in rows if r["split"] == s}) for s in SPLITS}
    samples = Counter(r["split"] for r in rows)
    printed, page = report(plain, tmp_path, capsys)
    lines = printed.splitlines()
    at = lines.index("split ratios (requested, achieved)")
    assert lines[at + 1].split() == ["split", "requested", "%", "batteries", "%", "samples", "%"]
    for line, split, requested in zip(lines[at + 2 : at + 5], SPLITS, (60, 20, 20), strict=True):
        assert line.split() == [split, f"{requested:.1f}",
                                f"{100 * batteries[split] / sum(batteries.values()):.1f}",
                                f"{100 * samples[split] / len(rows):.1f}"]
    assert "<h2>Split ratios (requested, achieved)</h2>" in page


def test_missing_summary_rejects_and_shard_are_said(plain: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """An incomplete output is still reported: requested ratios unknown, no rejects file, a
    thumbnail whose shard is gone named with the reason."""
    copy = tmp_path / "copy"
    shutil.copytree(plain, copy)
    (copy / "summary.json").unlink()
    (copy / "rejects.parquet").unlink()
    gone = manifest_rows(plain)[0]
    (copy / gone["shard"]).unlink()
    printed, page = report(copy, tmp_path, capsys)
    lines = printed.splitlines()
    at = lines.index("split ratios (requested, achieved)")
    assert [line.split()[:2] for line in lines[at + 2 : at + 5]] == [[s, "?"] for s in SPLITS]
    assert lines[at + 5] == "  (requested: not recorded, summary.json missing or unreadable)"
    assert "rejects: rejects.parquet not found" in lines
    assert f'data-key="{gone["key"]}"><p>cannot show: [Errno 2] No such file' in page


def thumbnails(page: str) -> list[tuple[str, str, str, Image.Image]]:
    """(split, class, key, image) of every gallery thumbnail on the page."""
    return [(split, name, key, Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            for split, name, key, data in THUMBNAIL.findall(page)]


def test_gallery_has_thumbnails_of_each_split_and_class(gallery_of: tuple[Path, str]) -> None:
    out, page = gallery_of
    rows = {r["key"]: r for r in manifest_rows(out)}
    shown = thumbnails(page)
    expected = Counter((r["split"], CLASSES[r["label"]]) for r in rows.values())
    assert Counter((split, name) for split, name, _, _ in shown) == {
        kind: min(GALLERY_PER_CLASS, count) for kind, count in expected.items()}
    assert len({key for _, _, key, _ in shown}) == len(shown)
    for split, name, key, image in shown:
        assert (rows[key]["split"], CLASSES[rows[key]["label"]]) == (split, name)
        assert max(image.size) <= THUMBNAIL_PX


def segment_distances(pixels: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance of each pixel centre (N x 2) to the closed polygon's edges (M x 2 vertices)."""
    starts, ends = polygon, np.roll(polygon, -1, axis=0)
    centres = pixels[:, None, :] + 0.5
    edge = ends - starts
    t = np.clip(((centres - starts) * edge).sum(-1) / np.maximum((edge**2).sum(-1), 1e-9), 0, 1)
    nearest = starts + t[..., None] * edge
    return np.sqrt(((centres - nearest) ** 2).sum(-1)).min(axis=1)


def along(polygon: np.ndarray) -> np.ndarray:
    """Points every half pixel along the closed polygon's edges."""
    ends = np.roll(polygon, -1, axis=0)
    return np.concatenate([np.linspace(a, b, int(np.hypot(*(b - a)) * 2) + 2)
                           for a, b in zip(polygon, ends, strict=True)])


def uncovered(polygon: np.ndarray, pixels: np.ndarray) -> float:
    """How far the point of the polygon's edges farthest from any of the pixels' centres is."""
    if not len(pixels):
        return np.inf
    points = along(polygon)
    return float(np.sqrt(((points[:, None, :] - pixels[None, :, :] - 0.5) ** 2).sum(-1))
                 .min(axis=1).max())


def drawn(bands: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(x, y) of the pixels of exactly `colour`."""
    ys, xs = np.nonzero((bands == colour).all(axis=2))
    return np.stack([xs, ys], axis=1).astype(float)


def test_gallery_polygons_lie_on_the_pixels_their_label_describes(
        gallery_of: tuple[Path, str]) -> None:
    """Each thumbnail against the sample read back with tarfile: the green pixels lie on the
    label's outline scaled to the thumbnail and follow all of it, the magenta ones on its defect
    polygons; inside a drawn defect polygon the thumbnail has the defect's colour."""
    out, page = gallery_of
    samples = read_shards(out)
    outlines = defects = 0
    for _, _, key, thumb in thumbnails(page):
        label = json.loads(samples[key]["json"])
        written = Image.open(io.BytesIO(samples[key].get("jpg") or samples[key]["png"]))
        scale = np.array([thumb.width / written.width, thumb.height / written.height])
        bands = np.asarray(thumb, np.int16)
        lines = drawn(bands, POLYGON_COLOUR)
        outline = label.get("battery_outline", {}).get("points") or label["swelling"].get(
            "battery_outline")
        if outline and len(outline) >= 6 and len(outline) % 2 == 0:
            polygon = np.array(outline, float).reshape(-1, 2) * scale
            green = drawn(bands, OUTLINE_COLOUR)
            assert segment_distances(green, polygon).max() <= 2.0, key
            # all of it is drawn (defects are drawn over the outline, and may hide some)
            assert uncovered(polygon, np.concatenate([green, lines])) <= 2.0, key
            outlines += 1
        else:
            assert not len(drawn(bands, OUTLINE_COLOUR)), key
        polygons = [np.array(d["points"], float).reshape(-1, 2) * scale
                    for d in label["defects"] or [] if len(d["points"]) % 2 == 0]
        if not polygons:
            assert not len(lines), key
            continue
        assert min(segment_distances(lines, p) for p in polygons).max() <= 2.0, key
        for defect, polygon in zip([d for d in label["defects"] if len(d["points"]) % 2 == 0],
                                   polygons, strict=True):
            assert uncovered(polygon, lines) <= 2.0, key
            mask = Image.new("L", thumb.size)
            ImageDraw.Draw(mask).polygon([tuple(p) for p in polygon], fill=255)
            inside = np.asarray(mask.filter(ImageFilter.MinFilter(5))) > 0  # 2 px in
            if inside.any():
                colour = np.array(DEFECT_COLOURS[defect["name"].lower()])
                assert np.abs(bands[inside] - colour).max() <= 50, key
                defects += 1
    assert outlines >= 10 and defects >= 3


def test_plots_name_every_split_and_tick_whole_numbers(plain: Path) -> None:
    """On a few rows (counts of 1 and 2, one image size), where matplotlib would otherwise tick
    halves: every count and pixel axis ticks integers; the class-balance legend shows each
    split's colour and each class; the histogram says it is stacked."""
    manifest, profile = load_manifest(plain)
    keys = [r["key"] for r in manifest_rows(plain) if r["width"] == 384][:3]
    rows = manifest.filter(pc.is_in(manifest["key"], value_set=pa.array(keys)))
    plots = figures(report_data(rows, profile, plain), rows, profile)
    balance = plots["Class balance per split"].axes[0]
    legend = balance.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [*SPLITS, "normal (0)", "defect (1)"]
    colours = [tuple(h.get_facecolor()) for h in legend.legend_handles[:3]]
    assert colours == [to_rgba(SPLIT_COLOURS[s]) for s in SPLITS]
    histogram = plots["Samples per battery"].axes[0]
    assert "stacked" in histogram.get_title()
    sizes = plots["Image sizes"].axes[0]
    counted = [balance.yaxis, plots["Defect types per split"].axes[0].yaxis, histogram.xaxis,
               histogram.yaxis, sizes.xaxis, sizes.yaxis]
    for figure in plots.values():
        figure.canvas.draw()
    for axis in counted:
        ticks = axis.get_majorticklocs()
        assert len(ticks) and np.all(ticks == np.round(ticks)), (axis, ticks)
