"""`shardify report`: the dataset at a glance, from the manifest alone.

Per split: class balance, image sizes and samples per group (battery), plus the dataset
profile's own sections (for the battery set: by data_type and form, defect types, swelling); as
text for the terminal, or as one self-contained HTML page with plots (matplotlib, embedded).
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .output.manifest import profile_of, read_parquet
from .output.store import MANIFEST
from .pathnames import path_text
from .plan.split import SPLITS
from .profiles import DatasetProfile

SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}


def load_manifest(out: Path) -> tuple[pa.Table, DatasetProfile]:
    """The manifest and the profile that wrote it; FileNotFoundError (said for the user) if it
    is missing, unreadable or names no profile shardify knows."""
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path_text(path)} not found: is {path_text(out)} a shardify "
                                "output?")
    try:
        table = read_parquet(path)
    except pa.ArrowException as error:
        raise FileNotFoundError(f"{path_text(path)} is damaged ({error}); re-run the convert "
                                "command to rewrite it") from None
    profile = profile_of(table.schema)
    if profile is None:
        raise FileNotFoundError(f"{path_text(path)} names no dataset profile shardify knows "
                                "(written by another version?); re-run the convert command")
    return table, profile


def report_data(manifest: pa.Table, profile: DatasetProfile) -> dict:
    """Every number the report shows, computed from the manifest with pyarrow: per split the
    samples, groups and class counts, image sizes and samples per group; and the profile's own
    sections."""
    by_split = {split: manifest.filter(pc.equal(manifest["split"], split)) for split in SPLITS}
    data: dict = {"splits": {}, "image_sizes": {}, "samples_per_group": {},
                  "sections": profile.report_sections(manifest, by_split)}
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
    return data


def _split_table(data: dict, profile: DatasetProfile) -> tuple[list[str], list[list]]:
    """Per split: samples, groups, each class, and the share of all but the first class."""
    others = "+".join(profile.class_names[1:])
    header = ["split", "samples", profile.group_unit, *profile.class_names, f"{others} %"]
    rows = []
    for split, row in data["splits"].items():
        other = sum(row["classes"][1:])
        share = 100 * other / row["samples"] if row["samples"] else 0.0
        rows.append([split, row["samples"], row["groups"], *row["classes"], f"{share:.1f}"])
    return header, rows


def format_text(data: dict, profile: DatasetProfile) -> str:
    header, rows = _split_table(data, profile)
    widths = [8, 9, 10, *[8] * len(profile.class_names), 8]
    lines = [_columns(header, [*widths[:-1], 9]), *(_columns(row, widths) for row in rows)]
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
               profile: DatasetProfile) -> None:
    """One self-contained page: the report's tables and plots as embedded PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    plots = {"Class balance per split": _class_balance(data, profile)}
    plots.update({f"{section.title.split(' (')[0].capitalize()} per split":
                  _bars(section.bars, section.bars_axis, section.title)
                  for section in data["sections"] if section.bars is not None})
    plots[f"Samples per {profile.group_noun}"] = _samples_per_group(data, profile)
    plots["Image sizes"] = _image_sizes(data, manifest.num_rows)
    sections = [f"<h1>{html.escape(title)}</h1>", _table(*_split_table(data, profile))]
    sections += [f"<h2>{html.escape(section.title.capitalize())}</h2>" + _table(
        list(section.table[0]), [list(row) for row in section.table[1]])
        for section in data["sections"] if section.table is not None]
    for heading, png in plots.items():
        encoded = base64.b64encode(png).decode()
        sections.append(f"<h2>{heading}</h2><img alt=\"{heading}\" "
                        f"src=\"data:image/png;base64,{encoded}\">")
    sections.append("<h2>Text report</h2><pre>" + html.escape(format_text(data, profile))
                    + "</pre>")
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}img{max-width:900px;display:block}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _class_balance(data: dict, profile: DatasetProfile) -> bytes:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    splits = list(data["splits"])
    colours = [SPLIT_COLOURS[s] for s in splits]
    bottom = [0] * len(splits)
    for number, name in enumerate(profile.class_names):
        counts = [data["splits"][s]["classes"][number] for s in splits]
        axis.bar(splits, counts, bottom=bottom, color=colours,
                 alpha=0.45 if number == 0 else 1.0, label=f"{name} ({number})")
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    first = profile.class_names[0]
    for x, split in enumerate(splits):
        total = data["splits"][split]["samples"]
        if total:
            share = 100 * (total - data["splits"][split]["classes"][0]) / total
            axis.text(x, total, f"{share:.0f}% not {first}", ha="center", va="bottom")
    axis.set_ylabel("images")
    axis.set_ylim(0, max([*bottom, 1]) * 1.15)
    axis.set_title(f"Classes per split ({first} light)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)


def _bars(counts: dict[str, dict[str, int]], axis_label: str, title: str) -> bytes:
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
    axis.set_title(title)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)


def _samples_per_group(data: dict, profile: DatasetProfile) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(7, 3.5))
    series = [data["samples_per_group"][s] for s in SPLITS]
    values = [v for counts in series for v in counts] or [0]
    step = max(1, (max(values) - min(values) + 1) // 30)
    bins = [b - 0.5 for b in range(min(values), max(values) + step + 1, step)]
    axis.hist(series, bins=bins, color=[SPLIT_COLOURS[s] for s in SPLITS],
              label=list(SPLITS), stacked=True)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel(f"images per {profile.group_noun}")
    axis.set_ylabel(profile.group_unit)
    axis.set_title(f"Samples per {profile.group_noun}")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)


def _image_sizes(data: dict, samples: int) -> bytes:
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
    axis.set_xlabel("width (px)")
    axis.set_ylabel("height (px)")
    axis.set_title("Image sizes (circle area: share of all images)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)
