"""The battery label schema: one AI Hub label JSON -> the few fields the manifest and split need.

Which field is the class, which fields make the battery (the group), which are extra
information; values the manifest cannot hold are rejected (`bad-label`) or stored as null.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from ...errors import BadLabel
from ..base import json_object, pixels, shown, text

MAX_ID = 2**63  # the manifest's battery_id is int64


CT_CLASSES = ("cell_normal", "cell_porosity", "module_normal", "module_porosity",
              "module_resin_overflow")
RGB_CLASSES = ("normal", "pollution", "damaged", "mixed")
DEFECT_TYPE_CLASSES = CT_CLASSES + RGB_CLASSES
"""`-P classes=defect-type`: `.cls` i names DEFECT_TYPE_CLASSES[i] (CT 0-4, RGB 5-8)."""


class Rules(NamedTuple):
    """The battery profile's `-P` options, as the parser uses them."""

    by_battery: bool = False  # group=battery: one group per battery_ids across data types
    defect_type: bool = False  # classes=defect-type instead of normal/defect
    normal_without_defects: bool = False  # is_normal false, no defects, no swelling: normal


DEFAULT_RULES = Rules()


class BatteryFields(NamedTuple):
    """What a sample needs from its label: the class, the battery, and descriptive extras."""

    data_type: str
    battery_id: int
    is_normal: bool
    type: str | None
    form: str | None
    swelling: bool | None
    defect_types: tuple[str, ...]
    width: int | None
    height: int | None
    label: int  # the class written to `.cls` (a position in the profile's class names)
    group: str  # the battery: a split never divides one
    without_defects: bool = False  # is_normal false, yet no defects listed and no swelling


def parse_label(raw: bytes | bytearray, rules: Rules = DEFAULT_RULES) -> BatteryFields:
    """Parse label bytes (BOM allowed); raise BadLabel saying what is missing or malformed."""
    document = json_object(raw)
    data_info = _section(document, "data_info")
    image_info = _section(document, "image_info")
    data_type = data_info.get("data_type")
    if not isinstance(data_type, str) or not data_type.strip():
        raise BadLabel("missing data_info.data_type")
    data_type = sys.intern(data_type.strip().lower())
    battery_id = _battery_id(data_info.get("battery_ids"))
    is_normal = image_info.get("is_normal")
    if is_normal in (0, 1) and not isinstance(is_normal, float):
        is_normal = bool(is_normal)  # true/false, or 1/0 as some exporters write
    else:
        raise BadLabel("missing image_info.is_normal" if is_normal is None
                       else f"image_info.is_normal is not true/false: {shown(is_normal)}")
    swelling = document.get("swelling")
    swelling = swelling.get("swelling") if isinstance(swelling, dict) else None
    swelling = swelling if isinstance(swelling, bool) else None
    defects = document.get("defects")
    defect_types = _defect_types(defects)
    without_defects = not is_normal and swelling is not True and not (
        isinstance(defects, list) and any(isinstance(d, dict) for d in defects))
    normal = is_normal or (rules.normal_without_defects and without_defects)
    kind = text(data_info.get("type"))
    return BatteryFields(
        data_type=data_type,
        battery_id=battery_id,
        is_normal=is_normal,
        type=kind,
        form=text(data_info.get("form")),
        swelling=swelling,
        defect_types=defect_types,
        width=pixels(image_info.get("width")),
        height=pixels(image_info.get("height")),
        label=_defect_type_class(data_type, kind, defect_types, normal, is_normal,
                                 _unnamed(swelling, without_defects))
        if rules.defect_type else 0 if normal else 1,
        group=sys.intern(str(battery_id) if rules.by_battery else f"{data_type}-{battery_id}"),
        without_defects=without_defects,
    )


def _unnamed(swelling: bool | None, without_defects: bool) -> str:
    """Why a not-normal label names no defect, for its defect-type reject."""
    if swelling:
        return "swelling only"
    if without_defects:
        return "nor swelling; -P normal_without_defects=true counts these as normal"
    return "its defects have no name"


def _defect_type_class(data_type: str, kind: str | None, defects: tuple[str, ...],
                       normal: bool, is_normal: bool, unnamed: str) -> int:
    """The class users train on: CT by type and defect, RGB by defect (both defects: mixed).
    `unnamed` says why a not-normal label with no defect name has none (for the reject)."""
    names = sorted({"_".join(name.lower().replace("_", " ").split()) for name in defects})
    if names and is_normal:
        raise BadLabel(f"image_info.is_normal is true but defects are listed ({', '.join(names)})"
                       ": no defect-type class")
    if not names and not normal:
        raise BadLabel(f"image_info.is_normal is false but no defect is named ({unnamed}): "
                       "no defect-type class")
    if data_type == "ct":
        folded = (kind or "").lower()
        if folded not in ("cell", "module"):
            raise BadLabel(f"data_info.type is not cell or module: {shown(kind)}: no "
                           "defect-type class")
        if len(names) > 1:
            raise BadLabel(f"several defects ({', '.join(names)}): no single defect-type class")
        name = f"{folded}_{names[0] if names else 'normal'}"
    elif data_type == "rgb":
        name = "mixed" if names == ["damaged", "pollution"] else names[0] if len(names) == 1 \
            else "normal" if not names else ", ".join(names)
    else:
        raise BadLabel(f"data_info.data_type {data_type!r} has no defect-type classes (ct, rgb)")
    if name not in DEFECT_TYPE_CLASSES or (data_type == "rgb") != (name in RGB_CLASSES):
        raise BadLabel(f"no defect-type class for {data_type} {name.replace('_', ' ')}")
    return DEFECT_TYPE_CLASSES.index(name)


def _section(document: dict[str, Any], name: str) -> dict[str, Any]:
    section = document.get(name)
    if not isinstance(section, dict):
        raise BadLabel(f"missing {name}")
    return section


def _battery_id(value: Any) -> int:
    """A battery number: an int, an integral float, ASCII digits, or a one-item list of those.

    One level of list only: a list inside the list is not a battery number (and unwrapping any
    depth would recurse without bound on a hostile label).
    """
    if isinstance(value, list) and len(value) == 1 and not isinstance(value[0], list):
        value = value[0]
    text = value.strip() if isinstance(value, str) else ""
    integral = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()) or (text.isascii() and text.isdigit())
    number = int(value) if integral else None
    if number is not None and 0 <= number < MAX_ID:
        return number
    raise BadLabel("missing data_info.battery_ids" if value is None
                   else f"data_info.battery_ids is not a battery number: {shown(value)}")


def _defect_types(defects: Any) -> tuple[str, ...]:
    """Distinct defect names in order of appearance, as written (report case-folds them)."""
    if not isinstance(defects, list):
        return ()
    names = (d.get("name") for d in defects if isinstance(d, dict))
    return tuple(dict.fromkeys(sys.intern(n.strip()) for n in names
                               if isinstance(n, str) and n.strip()))
