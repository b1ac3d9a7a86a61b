"""Move a venv built in a scratch tree to the path it will be installed at.

    relocate.py VENV PREFIX

A venv names its own location in its scripts' shebangs, its activate scripts and
pyvenv.cfg. Every such mention of VENV becomes PREFIX, the RECORD entries of rewritten
files get their new hashes and sizes, and the installer's cache notes (uv_cache.json, which
hold a build time) are dropped, so the tree is the same wherever and whenever it was built.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
from pathlib import Path

CACHE_NOTES = ("uv_cache.json", "uv_build.json")


def main(venv: Path, prefix: str) -> int:
    """Rewrite the venv in place; fail if any mention of the scratch path is left."""
    old = str(venv).encode()
    new = prefix.encode()
    rewritten: set[Path] = set()
    for path in sorted(venv.rglob("*")):
        if path.is_symlink():
            if old in str(path.readlink()).encode():
                raise SystemExit(f"relocate.py: {path} links into the build tree")
            continue
        if not path.is_file():
            continue
        if path.name in CACHE_NOTES and path.parent.name.endswith(".dist-info"):
            path.unlink()
            rewritten.add(path)
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))
            rewritten.add(path)
    for record in sorted(venv.glob("lib/python3*/site-packages/*.dist-info/RECORD")):
        _update_record(record, rewritten)
    leftovers = [p for p in venv.rglob("*") if p.is_file() and old in p.read_bytes()]
    if leftovers:
        raise SystemExit(f"relocate.py: still naming {venv}: {leftovers}")
    return 0


def _update_record(record: Path, rewritten: set[Path]) -> None:
    """Give the rewritten files of one distribution their new hash and size; drop deleted ones."""
    site = record.parent.parent
    rows = list(csv.reader(io.StringIO(record.read_text())))
    out = []
    changed = False
    for row in rows:
        if not row:
            continue
        target = (site / row[0]).resolve()
        if target in rewritten:
            changed = True
            if not target.exists():
                continue
            data = target.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            out.append([row[0], f"sha256={digest.decode()}", str(len(data))])
            continue
        out.append(row)
    if changed:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(out)
        record.write_text(buffer.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1]).resolve(), sys.argv[2]))
