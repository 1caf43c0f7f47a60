"""`shardify report`: the dataset at a glance, from the manifest alone.

Class balance, defect mix, swelling, image sizes and samples per battery, per split: as text for
the terminal, or as one self-contained HTML page with plots (matplotlib, images embedded).
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .manifest import read_parquet
from .pathnames import path_text
from .split import SPLITS

SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}


def load_manifest(out: Path) -> pa.Table:
    """The manifest; FileNotFoundError (said for the user) if it is missing or unreadable."""
    path = out / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path_text(path)} not found: is {path_text(out)} a shardify "
                                "output?")
    try:
        return read_parquet(path)
    except pa.ArrowException as error:
        raise FileNotFoundError(f"{path_text(path)} is damaged ({error}); re-run the convert "
                                "command to rewrite it") from None


def report_data(manifest: pa.Table) -> dict:
    """Every number the report shows, computed from the manifest with pyarrow."""
    data: dict = {"splits": {}, "by_kind": [], "defect_types": {}, "swelling": {},
                  "image_sizes": {}, "samples_per_battery": {}}
    for split in SPLITS:
        rows = manifest.filter(pc.equal(manifest["split"], split))
        defect = pc.sum(rows["label"]).as_py() or 0
        data["splits"][split] = {
            "samples": rows.num_rows,
            "batteries": pc.count_distinct(rows["group"]).as_py() if rows.num_rows else 0,
            "normal": rows.num_rows - defect,
            "defect": defect,
            "defect_ratio": defect / rows.num_rows if rows.num_rows else 0.0,
        }
        names = pc.utf8_lower(pc.list_flatten(rows["defect_types"])).to_pylist()
        data["defect_types"][split] = dict(Counter(names).most_common())
        data["swelling"][split] = {str(k): v for k, v in
                                   Counter(rows["swelling"].to_pylist()).most_common()}
        sizes = Counter(zip(rows["width"].to_pylist(), rows["height"].to_pylist(), strict=True))
        data["image_sizes"][split] = {f"{w}x{h}": n for (w, h), n in sizes.most_common()}
        per_battery = Counter(rows["group"].to_pylist())
        data["samples_per_battery"][split] = sorted(per_battery.values())
    grouped = manifest.group_by(["split", "data_type", "form", "label"]).aggregate(
        [("key", "count")])
    kinds: dict[tuple[str, str, str], dict[str, int]] = {}
    for row in grouped.to_pylist():
        counts = kinds.setdefault((row["split"], row["data_type"], row["form"] or "-"),
                                  {"normal": 0, "defect": 0})
        counts["defect" if row["label"] else "normal"] += row["key_count"]
    data["by_kind"] = [
        {"split": split, "data_type": data_type, "form": form, **counts}
        for (split, data_type, form), counts in sorted(
            kinds.items(), key=lambda item: (SPLITS.index(item[0][0]), item[0][1:]))
    ]
    return data


def format_text(data: dict) -> str:
    lines = ["split      samples  batteries   normal   defect  defect %"]
    for split, row in data["splits"].items():
        lines.append(f"{split:<8} {row['samples']:>9} {row['batteries']:>10} {row['normal']:>8} "
                     f"{row['defect']:>8} {100 * row['defect_ratio']:>8.1f}")
    lines += ["", "by data_type and form"]
    lines += [f"  {r['split']:<6} {r['data_type']:<5} {r['form']:<12} normal {r['normal']:>7}  "
              f"defect {r['defect']:>7}" for r in data["by_kind"]]
    lines += ["", "defect types (images containing each, case-folded)"]
    for split, counts in data["defect_types"].items():
        shown = ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"
        lines.append(f"  {split:<6} {shown}")
    lines += ["", "swelling"]
    lines += [f"  {split:<6} " + ", ".join(f"{k} {v}" for k, v in counts.items())
              for split, counts in data["swelling"].items()]
    lines += ["", "image sizes"]
    lines += [f"  {split:<6} " + (", ".join(f"{k} {v}" for k, v in sizes.items()) or "none")
              for split, sizes in data["image_sizes"].items()]
    lines += ["", "samples per battery (min / median / max)"]
    for split, counts in data["samples_per_battery"].items():
        summary = (f"{counts[0]} / {counts[len(counts) // 2]} / {counts[-1]}" if counts
                   else "none")
        lines.append(f"  {split:<6} {summary}")
    return "\n".join(lines)


def write_html(data: dict, manifest: pa.Table, path: Path, title: str) -> None:
    """One self-contained page: the report's tables and four plots as embedded PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    plots = {
        "Class balance per split": _class_balance(data),
        "Defect types per split": _defect_types(data),
        "Samples per battery": _samples_per_battery(data),
        "Image sizes": _image_sizes(manifest),
    }
    sections = [f"<h1>{html.escape(title)}</h1>", _table(
        ["split", "samples", "batteries", "normal", "defect", "defect %"],
        [[s, r["samples"], r["batteries"], r["normal"], r["defect"],
          f"{100 * r['defect_ratio']:.1f}"] for s, r in data["splits"].items()])]
    sections.append("<h2>By data_type and form</h2>" + _table(
        ["split", "data_type", "form", "normal", "defect"],
        [[r["split"], r["data_type"], r["form"], r["normal"], r["defect"]]
         for r in data["by_kind"]]))
    for heading, png in plots.items():
        encoded = base64.b64encode(png).decode()
        sections.append(f"<h2>{heading}</h2><img alt=\"{heading}\" "
                        f"src=\"data:image/png;base64,{encoded}\">")
    sections.append("<h2>Text report</h2><pre>" + html.escape(format_text(data)) + "</pre>")
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


def _class_balance(data: dict) -> bytes:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    splits = list(data["splits"])
    normal = [data["splits"][s]["normal"] for s in splits]
    defect = [data["splits"][s]["defect"] for s in splits]
    colours = [SPLIT_COLOURS[s] for s in splits]
    axis.bar(splits, normal, color=colours, alpha=0.45, label="normal (0)")
    axis.bar(splits, defect, bottom=normal, color=colours, label="defect (1)")
    for x, (n, d) in enumerate(zip(normal, defect, strict=True)):
        if n + d:
            axis.text(x, n + d, f"{100 * d / (n + d):.0f}% defect", ha="center", va="bottom")
    axis.set_ylabel("images")
    axis.set_ylim(0, max([n + d for n, d in zip(normal, defect, strict=True)] + [1]) * 1.15)
    axis.set_title("Normal (light) and defect (dark) images per split")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)


def _defect_types(data: dict) -> bytes:
    import matplotlib.pyplot as plt

    names = sorted({name for counts in data["defect_types"].values() for name in counts})
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(SPLITS)
    for i, split in enumerate(SPLITS):
        counts = [data["defect_types"][split].get(name, 0) for name in names]
        axis.bar([x + i * width for x in range(len(names))], counts, width,
                 color=SPLIT_COLOURS[split], label=split)
    axis.set_xticks([x + width for x in range(len(names))], names or ["(none)"])
    axis.set_ylabel("images containing the defect")
    axis.set_title("Defect types per split (case-folded)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)


def _samples_per_battery(data: dict) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(7, 3.5))
    series = [data["samples_per_battery"][s] for s in SPLITS]
    values = [v for counts in series for v in counts] or [0]
    step = max(1, (max(values) - min(values) + 1) // 30)
    bins = [b - 0.5 for b in range(min(values), max(values) + step + 1, step)]
    axis.hist(series, bins=bins, color=[SPLIT_COLOURS[s] for s in SPLITS],
              label=list(SPLITS), stacked=True)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("images per battery")
    axis.set_ylabel("batteries")
    axis.set_title("Samples per battery")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)


def _image_sizes(manifest: pa.Table) -> bytes:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    for split in SPLITS:
        rows = manifest.filter(pc.equal(manifest["split"], split))
        sizes = Counter(zip(rows["width"].to_pylist(), rows["height"].to_pylist(), strict=True))
        known = [(w, h, n) for (w, h), n in sizes.items() if w is not None and h is not None]
        if known:
            axis.scatter([w for w, _, _ in known], [h for _, h, _ in known],
                         s=[30 + 400 * n / manifest.num_rows for _, _, n in known],
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
