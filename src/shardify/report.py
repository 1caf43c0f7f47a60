"""`shardify report`: the dataset at a glance, from the manifest, rejects and summary.

Per split: class balance, the requested split ratios next to the achieved ones, image sizes and
samples per group (battery), the rejects, plus the dataset profile's own sections (for the
battery set: by data_type and form, defect types, swelling); as text for the terminal, or as one
self-contained HTML page with plots (matplotlib, embedded) and a gallery: thumbnails read from
the shards with the written label's polygons drawn over them, so that a wrong crop or coordinate
mapping shows at a glance. OUT may be a URL (read through fsspec); the HTML page is local.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .errors import UsageError
from .output.manifest import profile_of, read_parquet
from .output.store import MANIFEST, REJECTS, SUMMARY, Store, output_store
from .plan.split import SPLITS
from .profiles import DatasetProfile, Geometry
from .storage import Location
from .transform.geometry import flat_points, locations, xywh_corners

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
REJECT_ROWS = 10  # rows of rejects.parquet shown (all of them are in the file)
REJECT_HEADER = ["reason", "key", "source_archive", "source_member", "detail"]
GALLERY_PER_CLASS = 4  # thumbnails per split and class
THUMBNAIL_PX = 192  # a thumbnail's longer side, at most
# Drawn without antialiasing in colours the images hardly have, so a drawn pixel is known.
Colour = tuple[int, int, int]
OUTLINE_COLOUR = (0, 255, 0)  # the profile's outline paths
POLYGON_COLOUR = (255, 0, 255)  # every other point list (the battery set: defects)
LINE_WIDTH = 2
GALLERY_COLUMNS = ["key", "group", "shard", "offset", "sample_bytes", "image_ext", "image_bytes",
                   "label_bytes"]


def load_manifest(out: Location | str, profile_file: str | None = None
                  ) -> tuple[pa.Table, DatasetProfile]:
    """The manifest and the profile that wrote it (see `profile_of` for `profile_file`);
    FileNotFoundError (said for the user) if it is missing, unreadable or names no profile
    shardify can have."""
    store = output_store(out)
    shown = f"{store.shown}/{MANIFEST}"
    if not store.exists(MANIFEST):
        raise FileNotFoundError(f"{shown} not found: is {store.shown} a shardify output?")
    try:
        with store.open(MANIFEST) as handle:
            table = read_parquet(handle)
    except pa.ArrowException as error:
        raise FileNotFoundError(f"{shown} is damaged ({error}); re-run the convert "
                                "command to rewrite it") from None
    try:
        profile = profile_of(table.schema, profile_file)
    except UsageError as error:
        raise FileNotFoundError(f"{shown}: {error}") from None
    return table, profile


def report_data(manifest: pa.Table, profile: DatasetProfile, out: Location | str) -> dict:
    """Every number the report shows, computed from the manifest with pyarrow: per split the
    samples, groups and class counts, the achieved split ratios, image sizes and samples per
    group; the profile's own sections; and from OUT's other files the requested ratios and the
    rejects."""
    store = output_store(out)
    by_split = {split: manifest.filter(pc.equal(manifest["split"], split)) for split in SPLITS}
    data: dict = {"splits": {}, "image_sizes": {}, "samples_per_group": {},
                  "sections": profile.report_sections(manifest, by_split),
                  "rejects": _rejects(store)}
    for split, rows in by_split.items():
        labels = Counter(rows["label"].to_pylist())
        data["splits"][split] = {
            "samples": rows.num_rows,
            "groups": pc.count_distinct(rows["group"]).as_py() if rows.num_rows else 0,
            "classes": [labels[i] for i in range(len(profile.class_names))],
        }
        sizes = Counter(zip(rows["width"].to_pylist(), rows["height"].to_pylist(), strict=True))
        data["image_sizes"][split] = sizes.most_common()  # [((width, height), count)]
        data["samples_per_group"][split] = sorted(Counter(rows["group"].to_pylist()).values())
    data["ratios"] = _ratios(store, data["splits"])
    return data


def _ratios(store: Store, splits: dict[str, dict]) -> dict[str, list[float] | None]:
    """Per split, in percent: the ratio convert was asked for (summary.json; None when it does
    not say) and the shares of groups and of samples the split got."""
    try:
        asked = orjson.loads(store.read_bytes(SUMMARY))["options"]["ratios"]
        requested = [100 * float(r) for r in asked] if len(asked) == len(SPLITS) else None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        requested = None
    achieved = {}
    for unit in ("groups", "samples"):
        total = sum(row[unit] for row in splits.values())
        achieved[unit] = [100 * row[unit] / total if total else 0.0 for row in splits.values()]
    return {"requested": requested, **achieved}


def _rejects(store: Store) -> dict[str, Any]:
    """rejects.parquet at a glance: how many, per reason, and the first rows; or why not."""
    if not store.exists(REJECTS):
        return {"problem": f"{REJECTS} not found"}
    try:
        with store.open(REJECTS) as handle:
            table = read_parquet(handle, columns=REJECT_HEADER)
    except (pa.ArrowException, OSError) as error:
        return {"problem": f"{REJECTS} cannot be read ({error})"}
    return {"total": table.num_rows,
            "reasons": dict(sorted(Counter(table["reason"].to_pylist()).items())),
            "first": table.slice(0, REJECT_ROWS).to_pylist()}


def _split_table(data: dict, profile: DatasetProfile) -> tuple[list[str], list[list]]:
    """Per split: samples, groups, each class, and with two classes the second's share."""
    names = profile.class_names
    share = [f"{names[1]} %"] if len(names) == 2 else []
    header = ["split", "samples", profile.group_unit, *names, *share]
    rows = []
    for split, row in data["splits"].items():
        shares = [f"{100 * row['classes'][1] / row['samples'] if row['samples'] else 0.0:.1f}"]
        rows.append([split, row["samples"], row["groups"], *row["classes"],
                     *shares[:len(share)]])
    return header, rows


def _ratio_table(data: dict, profile: DatasetProfile) -> tuple[list[str], list[list]]:
    """Per split: the requested ratio next to the achieved shares of groups and samples."""
    ratios = data["ratios"]
    header = ["split", "requested %", f"{profile.group_unit} %", "samples %"]
    requested = ratios["requested"] or ["?"] * len(SPLITS)
    return header, [[split, _percent(asked), _percent(groups), _percent(samples)]
                    for split, asked, groups, samples in zip(
                        data["splits"], requested, ratios["groups"], ratios["samples"],
                        strict=True)]


def _percent(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.1f}"


def _reject_rows(rejects: dict) -> list[list[str]]:
    return [[row[name] for name in REJECT_HEADER] for row in rejects["first"]]


def _rejects_title(rejects: dict) -> str:
    if "problem" in rejects:
        return f"rejects: {rejects['problem']}"
    shown = min(rejects["total"], REJECT_ROWS)
    return f"rejects: {rejects['total']} in {REJECTS}" + (f", the first {shown}:" if shown
                                                         else "")


def format_text(data: dict, profile: DatasetProfile) -> str:
    header, rows = _split_table(data, profile)
    widths = [8, 9, 10, *(max(8, len(name) + 1) for name in header[3:])]
    lines = [_columns(header, widths), *(_columns(row, widths) for row in rows)]
    header, rows = _ratio_table(data, profile)
    widths = [8, 12, max(12, len(header[2]) + 1), 10]
    lines += ["", "split ratios (requested, achieved)",
              *(_columns(row, widths) for row in [header, *rows])]
    if data["ratios"]["requested"] is None:
        lines.append(f"  (requested: not recorded, {SUMMARY} missing or unreadable)")
    rejects = data["rejects"]
    lines += ["", _rejects_title(rejects)]
    if rejects.get("total"):
        lines.append("  by reason: " + ", ".join(f"{reason} {count}"
                                                for reason, count in rejects["reasons"].items()))
        lines += [f"  {reason:<18} {key}  {archive}:{member}  {detail}"
                  for reason, key, archive, member, detail in _reject_rows(rejects)]
    for section in data["sections"]:
        lines += ["", section.title, *section.lines]
    lines += ["", "image sizes"]
    lines += [f"  {split:<6} " + (", ".join(f"{w}x{h} {n}" for (w, h), n in sizes) or "none")
              for split, sizes in data["image_sizes"].items()]
    lines += ["", f"samples per {profile.group_noun} (min / median / max)"]
    for split, counts in data["samples_per_group"].items():
        summary = (f"{counts[0]} / {counts[len(counts) // 2]} / {counts[-1]}" if counts
                   else "none")
        lines.append(f"  {split:<6} {summary}")
    return "\n".join(lines)


def _columns(values: list, widths: list[int]) -> str:
    """The first value left-aligned, the others right-aligned, each in its width."""
    return " ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
                    for i, (v, w) in enumerate(zip(values, widths, strict=True)))


def write_html(data: dict, manifest: pa.Table, path: Path, title: str,
               profile: DatasetProfile, out: Location | str) -> None:
    """One self-contained page: the report's tables, its plots and the gallery as embedded
    PNGs."""
    sections = [f"<h1>{html.escape(title)}</h1>", _table(*_split_table(data, profile)),
                "<h2>Split ratios (requested, achieved)</h2>", _table(*_ratio_table(data, profile))]
    sections += [f"<h2>{html.escape(section.title.capitalize())}</h2>" + _table(
        list(section.table[0]), [list(row) for row in section.table[1]])
        for section in data["sections"] if section.table is not None]
    rejects = data["rejects"]
    sections.append(f"<h2>Rejects</h2><p>{html.escape(_rejects_title(rejects))}</p>")
    if rejects.get("total"):
        sections += [_table(["reason", "count"], [list(item) for item in
                                                  rejects["reasons"].items()]),
                     _table(REJECT_HEADER, _reject_rows(rejects))]
    for heading, figure in figures(data, manifest, profile).items():
        sections.append(f"<h2>{heading}</h2><img class=\"plot\" alt=\"{heading}\" "
                        f"src=\"data:image/png;base64,{_base64(_png(figure))}\">")
    sections.append(_gallery_html(out, manifest, profile))
    sections.append("<h2>Text report</h2><pre>" + html.escape(format_text(data, profile))
                    + "</pre>")
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}img.plot{max-width:900px;display:block}"
            "figure{display:inline-block;margin:4px;vertical-align:top}"
            "figcaption{font-size:small;max-width:" f"{THUMBNAIL_PX}px;overflow-wrap:anywhere}}"
            "</style></head><body>" + "\n".join(sections) + "</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def figures(data: dict, manifest: pa.Table, profile: DatasetProfile) -> dict[str, Figure]:
    """The HTML page's plots by heading, as matplotlib figures (closed once saved)."""
    import matplotlib

    matplotlib.use("Agg")
    plots = {"Class balance per split": _class_balance(data, profile)}
    plots.update({f"{section.title.split(' (')[0].capitalize()} per split":
                  _bars(section.bars, section.bars_axis, section.title)
                  for section in data["sections"] if section.bars is not None})
    plots[f"Samples per {profile.group_noun}"] = _samples_per_group(data, profile)
    plots["Image sizes"] = _image_sizes(data, manifest.num_rows)
    return plots


def _integer_ticks(*axes: Any) -> None:
    """Counts and pixels are whole numbers: no 0.5 ticks on their axes, even where the view
    holds a single integer (one battery size)."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _class_balance(data: dict, profile: DatasetProfile) -> Figure:
    """Stacked bars per split in the split's colour, the first class light; the legend names
    both: each split's colour, and the classes' shades."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figure, axis = plt.subplots(figsize=(7, 3.5))
    splits = list(data["splits"])
    colours = [SPLIT_COLOURS[s] for s in splits]
    bottom = [0] * len(splits)
    for number in range(len(profile.class_names)):
        counts = [data["splits"][s]["classes"][number] for s in splits]
        axis.bar(splits, counts, bottom=bottom, color=colours, alpha=_class_alpha(number))
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    first = profile.class_names[0]
    for x, split in enumerate(splits):
        total = data["splits"][split]["samples"]
        if total:
            share = 100 * (total - data["splits"][split]["classes"][0]) / total
            axis.text(x, total, f"{share:.0f}% not {first}", ha="center", va="bottom")
    axis.set_ylabel("images")
    axis.set_ylim(0, max([*bottom, 1]) * 1.15)
    _integer_ticks(axis.yaxis)
    axis.set_title(f"Classes per split ({first} light)")
    handles = [Patch(color=SPLIT_COLOURS[s], label=s) for s in splits]
    handles += [Patch(color="grey", alpha=_class_alpha(number), label=f"{name} ({number})")
                for number, name in enumerate(profile.class_names)]
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def _class_alpha(number: int) -> float:
    return 0.45 if number == 0 else 1.0


def _bars(counts: dict[str, dict[str, int]], axis_label: str, title: str) -> Figure:
    """Grouped bars: per name, one bar per split."""
    import matplotlib.pyplot as plt

    names = sorted({name for found in counts.values() for name in found})
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(SPLITS)
    for i, split in enumerate(SPLITS):
        heights = [counts.get(split, {}).get(name, 0) for name in names]
        axis.bar([x + i * width for x in range(len(names))], heights, width,
                 color=SPLIT_COLOURS[split], label=split)
    axis.set_xticks([x + width for x in range(len(names))], names or ["(none)"])
    axis.set_ylabel(axis_label)
    _integer_ticks(axis.yaxis)
    axis.set_title(title)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def _samples_per_group(data: dict, profile: DatasetProfile) -> Figure:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    series = [data["samples_per_group"][s] for s in SPLITS]
    values = [v for counts in series for v in counts] or [0]
    step = max(1, (max(values) - min(values) + 1) // 30)
    bins = [b - 0.5 for b in range(min(values), max(values) + step + 1, step)]
    axis.hist(series, bins=bins, color=[SPLIT_COLOURS[s] for s in SPLITS],
              label=list(SPLITS), stacked=True)
    _integer_ticks(axis.xaxis, axis.yaxis)
    axis.set_xlabel(f"images per {profile.group_noun}")
    axis.set_ylabel(profile.group_unit)
    axis.set_title(f"Samples per {profile.group_noun} (stacked: splits on top of each other)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def _image_sizes(data: dict, samples: int) -> Figure:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    for split, sizes in data["image_sizes"].items():
        known = [(w, h, n) for (w, h), n in sizes if w is not None and h is not None]
        if known:
            axis.scatter([w for w, _, _ in known], [h for _, h, _ in known],
                         s=[30 + 400 * n / samples for _, _, n in known],
                         facecolors="none", edgecolors=SPLIT_COLOURS[split], linewidths=2,
                         label=split)
            for w, h, _ in known:
                axis.annotate(f"{w}x{h}", (w, h), textcoords="offset points", xytext=(12, -4))
    axis.margins(0.25)
    _integer_ticks(axis.xaxis, axis.yaxis)
    axis.set_xlabel("width (px)")
    axis.set_ylabel("height (px)")
    axis.set_title("Image sizes (circle area: share of all images)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


@dataclass(frozen=True)
class Thumbnail:
    """One gallery image: a sample's written image, small, with its label's polygons drawn;
    `png` is None when it could not be made (`problem` says why)."""

    split: str
    class_name: str
    key: str
    group: str
    png: bytes | None
    problem: str = ""


def gallery(out: Location | str, manifest: pa.Table, profile: DatasetProfile
            ) -> Iterator[Thumbnail]:
    """Up to GALLERY_PER_CLASS thumbnails per split and class, spread evenly over the rows (so
    over the groups), read from the shards at the manifest's offsets."""
    from .rows import image_and_label

    store = output_store(out)
    for split in SPLITS:
        rows = manifest.filter(pc.equal(manifest["split"], split))
        for number, name in enumerate(profile.class_names):
            mine = rows.filter(pc.equal(rows["label"], number)).select(GALLERY_COLUMNS)
            step = max(1, mine.num_rows // GALLERY_PER_CLASS)
            picks = pa.array(range(0, mine.num_rows, step)[:GALLERY_PER_CLASS], pa.int64())
            for row in mine.take(picks).to_pylist():
                try:
                    png = thumbnail(*image_and_label(store, row), profile.geometry)
                except (OSError, ValueError) as error:  # PIL's errors, bad JSON: shown, not raised
                    yield Thumbnail(split, name, row["key"], row["group"], None, str(error))
                else:
                    yield Thumbnail(split, name, row["key"], row["group"], png)


def thumbnail(image_data: bytes, label_data: bytes, geometry: Geometry) -> bytes:
    """The image at most THUMBNAIL_PX a side, as RGB PNG (lossless: drawn colours stay exact),
    with the label's point lists scaled along and drawn over it: the outline's in
    OUTLINE_COLOUR, the others in POLYGON_COLOUR (drawn last, on top)."""
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(image_data)) as image:
        width = image.width
        # A JPEG is decoded at 1/2..1/8 size: decoded pixel i covers stored [i*f, (i+1)*f).
        drafted = image.draft(image.mode, (THUMBNAIL_PX, THUMBNAIL_PX))
        reduced = width / drafted[1][2] if drafted else 1.0
        picture = image.convert("RGB")
    decoded = picture.size
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    sx, sy = (picture.width / (decoded[0] * reduced), picture.height / (decoded[1] * reduced))
    draw = ImageDraw.Draw(picture)
    for points, colour in label_polygons(orjson.loads(label_data), geometry):
        xy = [(x * sx, y * sy) for x, y in zip(points[0::2], points[1::2], strict=True)]
        draw.line([*xy, xy[0]] if len(xy) > 2 else xy, fill=colour, width=LINE_WIDTH)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def label_polygons(label: Any, geometry: Geometry) -> list[tuple[list[float], Colour]]:
    """Every point list of two points or more the profile declares in `label`, with the colour
    it is drawn in: the outline's first."""
    drawn: list[tuple[list[float], Colour]] = []
    for path in sorted(geometry.point_lists, key=lambda p: p not in geometry.outline):
        colour = OUTLINE_COLOUR if path in geometry.outline else POLYGON_COLOUR
        for parent, key in locations(label, path):
            points = flat_points(parent[key])
            if points is not None and len(points) >= 4:
                drawn.append((points, colour))
    boxes = [flat_points(parent[key]) for path in geometry.corner_boxes
             for parent, key in locations(label, path)]
    boxes += [xywh_corners(parent[key]) for path in geometry.xywh_boxes
              for parent, key in locations(label, path)]
    for corners in boxes:
        if corners is not None and len(corners) == 4:
            x1, y1, x2, y2 = corners
            drawn.append(([x1, y1, x2, y1, x2, y2, x1, y2], POLYGON_COLOUR))
    return drawn


def _gallery_html(out: Location | str, manifest: pa.Table, profile: DatasetProfile) -> str:
    """The gallery's heading, a legend of the colours, and per split and class a row of
    figures (each with its key and group, and the split and class as data attributes)."""
    geometry = profile.geometry
    others = [p for p in (*geometry.point_lists, *geometry.corner_boxes, *geometry.xywh_boxes)
              if p not in geometry.outline]
    legend = (f"outline ({', '.join('.'.join(p) for p in geometry.outline) or 'none'}) in "
              "green, the other point lists and boxes "
              f"({', '.join('.'.join(p) for p in others) or 'none'})"
              " in magenta, as written in each sample's label JSON")
    parts = ["<h2>Gallery</h2>", f"<p>Read from the shards: {html.escape(legend)}.</p>"]
    heading = None
    for item in gallery(out, manifest, profile):
        if (item.split, item.class_name) != heading:
            heading = item.split, item.class_name
            parts.append(f"<h3>{item.split}: {html.escape(item.class_name)}</h3>")
        key, group = html.escape(item.key), html.escape(item.group)
        body = (f"<img alt=\"{key}\" src=\"data:image/png;base64,{_base64(item.png)}\">"
                if item.png is not None else f"<p>cannot show: {html.escape(item.problem)}</p>")
        parts.append(f"<figure class=\"thumb\" data-split=\"{item.split}\" data-class="
                     f"\"{html.escape(item.class_name)}\" data-key=\"{key}\">{body}"
                     f"<figcaption>{key}<br>{html.escape(profile.group_noun)} {group}"
                     "</figcaption></figure>")
    return "\n".join(parts)
