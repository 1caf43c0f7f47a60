"""How a path name that is not UTF-8 is shown and stored: one rule for manifests, JSON and messages.

On Linux a name is bytes; Python gives the bytes that are not UTF-8 as lone surrogates
(`'\\udcb9'`), which UTF-8 writers (orjson, Arrow, a UTF-8 terminal) refuse. Korean Windows tools
write folder names in CP949, so that reading is shown where the bytes decode as CP949; anything
else keeps its bytes escaped (`\\xff`). Files are always opened by the real path: only the text
shown or stored is converted.
"""

from __future__ import annotations

import os


def path_text(path: str | os.PathLike[str], *, read_cp949: bool = True) -> str:
    """`path` as text: unchanged when its bytes are UTF-8 (nearly always), else each
    undecodable component read as CP949 (unless `read_cp949` is false) or escaped."""
    name = os.fspath(path)
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        return "/".join(_component_text(part, read_cp949) for part in name.split("/"))


def _component_text(component: str, read_cp949: bool) -> str:
    """One component ('/' is never part of a CP949 character, so each decodes alone)."""
    raw = os.fsencode(component)
    for encoding in ("utf-8", "cp949") if read_cp949 else ("utf-8",):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("utf-8", "backslashreplace")
