"""Schemas of state descriptions and the static compatibility checker.

:func:`schema_of` turns a state class into a JSON-ready dict (the format is in
docs/vmstate-format.md, section "Schema").  Device types commit one schema per
description; :func:`check_schema_compat` compares the committed schema with the
current one and lists every change that would make a stream of the committed
version fail to load, or that changes the wire layout without a version bump —
the job of QEMU's vmstate-static-checker.
"""

from __future__ import annotations

from typing import Any

from pcidev.vmstate.description import (
    KArray,
    KBool,
    KBytes,
    KFd,
    KNullable,
    KSInt,
    KStr,
    KStruct,
    KSub,
    KUInt,
    description_of,
)

__all__ = ["SCHEMA_FORMAT", "schema_of", "check_schema_compat"]

#: Version of the schema JSON layout (the ``schema_format`` key).
SCHEMA_FORMAT = 1


def schema_of(cls: type) -> dict[str, Any]:
    """The schema of a state class: name, versions, fields with their types,
    subsections; nested descriptions inline.

    :param cls: a state class.
    :returns: a JSON-serializable dict (``schema_format`` at the top).
    :raises ConfigError: on a bad description.
    """
    return {"schema_format": SCHEMA_FORMAT, **_describe(cls)}


def _describe(cls: type) -> dict[str, Any]:
    desc = description_of(cls)
    fields = []
    subs = []
    for spec in desc.fields:
        if isinstance(spec.kind, KSub):
            subs.append({"field": spec.name, "description": _describe(spec.kind.cls)})
        else:
            fields.append({"name": spec.name, "since": spec.since, "has_default": spec.has_default,
                           "type": _type(spec.kind)})
    return {
        "name": desc.name,
        "version": desc.version,
        "min_version": desc.min_version,
        "upgrades": sorted(desc.upgrades),
        "fields": fields,
        "subsections": subs,
    }


def _type(kind: Any) -> dict[str, Any]:
    if isinstance(kind, KUInt):
        return {"kind": "uint", "bits": kind.bits}
    if isinstance(kind, KSInt):
        return {"kind": "int", "bits": kind.bits}
    if isinstance(kind, KBool):
        return {"kind": "bool"}
    if isinstance(kind, KBytes):
        if kind.length is not None:
            return {"kind": "bytes", "length": kind.length}
        return {"kind": "bytes", "max_length": kind.max_length}
    if isinstance(kind, KStr):
        return {"kind": "str", "max_length": kind.max_length}
    if isinstance(kind, KFd):
        return {"kind": "fd"}
    if isinstance(kind, KStruct):
        return {"kind": "struct", "description": _describe(kind.cls)}
    if isinstance(kind, KArray):
        out: dict[str, Any] = {"kind": "array"}
        if kind.length is not None:
            out["length"] = kind.length
        else:
            out["max_length"] = kind.max_length
        out["element"] = _type(kind.element)
        return out
    if isinstance(kind, KNullable):
        return {"kind": "optional", "value": _type(kind.inner)}
    raise TypeError(f"unknown kind {kind!r}")  # pragma: no cover


# ----------------------------------------------------------------- checker
def check_schema_compat(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """List the problems of replacing description schema ``old`` by ``new``.

    Rules (per description, recursively for nested descriptions and subsections):

    * the name must not change, the version must not go down, ``min_version`` must
      not rise (that drops streams that loaded before) and no upgrade step may
      disappear;
    * without a version bump the wire layout must be identical, except that new
      subsections may appear;
    * with a bump, a removed field or a changed (not widened) type needs an upgrade
      step that runs on old-version streams; an added field needs such a step, or
      ``since`` above the old version and a default; a widened type (larger
      integer, larger maximum length, value made optional) is fine;
    * a subsection must never disappear (streams carrying it would be refused);
    * a nested description is checked against its own versions, so changing it
      with its own bump does not require bumping the parent.

    :param old: the committed schema (from :func:`schema_of`).
    :param new: the current schema.
    :returns: human-readable problems; empty when ``new`` is compatible.
    """
    out: list[str] = []
    try:
        for key in ("schema_format",):
            if old.get(key) != new.get(key):
                out.append(f"schema_format changed from {old.get(key)!r} to {new.get(key)!r}")
        _cmp_desc(old, new, str(new.get("name", "?")), out)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        out.append(f"malformed schema: {type(e).__name__}: {e}")
    return out


def _cmp_desc(old: dict[str, Any], new: dict[str, Any], where: str, out: list[str]) -> None:
    if old["name"] != new["name"]:
        out.append(f"{where}: description renamed from {old['name']!r} to {new['name']!r} "
                   f"(sections and subsections are matched by name)")
        return
    ov, nv = int(old["version"]), int(new["version"])
    omin, nmin = int(old["min_version"]), int(new["min_version"])
    if nv < ov:
        out.append(f"{where}: version went down from {ov} to {nv}")
        return
    if nmin > omin:
        out.append(f"{where}: min_version rose from {omin} to {nmin}: streams of versions "
                   f"{omin}..{nmin - 1} no longer load")
    ups_old, ups_new = set(old["upgrades"]), set(new["upgrades"])
    for u in sorted(ups_old - ups_new):
        if u >= nmin:
            out.append(f"{where}: upgrade step {u}->{u + 1} removed")
    bumped = nv > ov
    # a step that runs on streams of the old version
    has_step = any(ov <= u < nv for u in ups_new)

    ofields = {f["name"]: f for f in old["fields"]}
    nfields = {f["name"]: f for f in new["fields"]}
    for name in ofields:
        if name in nfields:
            continue
        if not bumped:
            out.append(f"{where}: field {name!r} removed without a version bump")
        elif not has_step:
            out.append(f"{where}: field {name!r} removed in version {nv}, but no upgrade step "
                       f"removes it from version {ov} streams")
    for name, f in nfields.items():
        if name in ofields:
            continue
        if not bumped:
            out.append(f"{where}: field {name!r} added without a version bump")
        elif has_step:
            continue  # the step supplies it (a rename, a computed value) or it has a default
        elif int(f["since"]) <= ov:
            out.append(f"{where}: field {name!r} added with since={f['since']}, but version {ov} "
                       f"streams do not have it (use since={ov + 1} or later, or an upgrade step)")
        elif not f["has_default"]:
            out.append(f"{where}: field {name!r} added with no default and no upgrade step")
    for name in ofields.keys() & nfields.keys():
        o, n = ofields[name], nfields[name]
        fwhere = f"{where}.{name}"
        if o["since"] != n["since"]:
            out.append(f"{fwhere}: since changed from {o['since']} to {n['since']}")
        change = _type_change(o["type"], n["type"], fwhere, out)
        if change == "same":
            continue
        if not bumped:
            out.append(f"{fwhere}: type changed without a version bump "
                       f"({_short(o['type'])} -> {_short(n['type'])})")
        elif change == "changed" and not has_step:
            out.append(f"{fwhere}: type changed incompatibly ({_short(o['type'])} -> "
                       f"{_short(n['type'])}) with no upgrade step from version {ov}")

    osubs = {s["description"]["name"]: s for s in old["subsections"]}
    nsubs = {s["description"]["name"]: s for s in new["subsections"]}
    for name in osubs:
        if name not in nsubs:
            out.append(f"{where}: subsection {name!r} removed: streams that carry it would be refused")
        else:
            _cmp_desc(osubs[name]["description"], nsubs[name]["description"], f"{where}/{name}", out)


def _short(t: dict[str, Any]) -> str:
    k = t.get("kind")
    if k in ("uint", "int"):
        return f"{'u' if k == 'uint' else 'i'}{t['bits']}"
    if k in ("bytes", "str", "array"):
        n = f"[{t['length']}]" if "length" in t else f"[<={t.get('max_length')}]"
        if k == "array":
            return f"array{n} of {_short(t['element'])}"
        return f"{k}{n}"
    if k == "struct":
        return f"struct {t['description']['name']!r}"
    if k == "optional":
        return f"optional {_short(t['value'])}"
    return str(k)


def _len_range(t: dict[str, Any]) -> tuple[float, float]:
    if "length" in t:
        return t["length"], t["length"]
    m = t.get("max_length")
    return 0, float("inf") if m is None else m


def _worst(*changes: str) -> str:
    if "changed" in changes:
        return "changed"
    if "widened" in changes:
        return "widened"
    return "same"


def _type_change(o: dict[str, Any], n: dict[str, Any], where: str, out: list[str]) -> str:
    """Classify a type change as "same", "widened" (every old value is still valid)
    or "changed"; nested descriptions are checked on their own into ``out``."""
    ko, kn = o["kind"], n["kind"]
    if ko == "struct" and kn == "struct":
        _cmp_desc(o["description"], n["description"], where, out)
        return "same"
    if ko == "optional" and kn == "optional":
        return _type_change(o["value"], n["value"], where, out)
    if kn == "optional":
        return _worst("widened", _type_change(o, n["value"], where, out))
    if ko != kn:
        if ko == "uint" and kn == "int" and n["bits"] > o["bits"]:
            return "widened"
        return "changed"
    if ko in ("uint", "int"):
        if n["bits"] == o["bits"]:
            return "same"
        return "widened" if n["bits"] > o["bits"] else "changed"
    if ko in ("bool", "fd"):
        return "same"
    if ko in ("bytes", "str", "array"):
        (olo, ohi), (nlo, nhi) = _len_range(o), _len_range(n)
        if (olo, ohi) == (nlo, nhi):
            length = "same"
        elif nlo <= olo and ohi <= nhi:
            length = "widened"
        else:
            length = "changed"
        if ko == "array":
            return _worst(length, _type_change(o["element"], n["element"], where + "[]", out))
        return length
    return "changed"
