"""Write the package's machine-readable copyright file from the bundled distributions' metadata.

    copyright.py SITE_PACKAGES INSTALLED_SITE_PACKAGES > copyright

guardd itself is MIT. Each bundled distribution gets a Files paragraph for what its RECORD
installs, its license as its metadata declares it, the copyright lines of its own license
files, and the text of those files (a pointer to /usr/share/common-licenses for the licenses
Debian ships there).
"""

from __future__ import annotations

import csv
import email.parser
import io
import re
import sys
from pathlib import Path

FORMAT = "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
SOURCE = "https://github.com/guardd/guardd"
MIT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
# Licenses whose full text Debian ships: a pointer replaces the copy (Debian policy 12.5).
COMMON = {
    "Apache-2.0": ("Apache License", "Version 2.0, January 2004"),
    "MPL-2.0": ("Mozilla Public License Version 2.0",),
}
CLASSIFIERS = {
    "License :: OSI Approved :: MIT License": "MIT",
    "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    "License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
}
COPYRIGHT_LINE = re.compile(r"^\s*Copyright\s*(?:\(c\)|©)?\s*(.*\d{4}.*)$", re.IGNORECASE)


def main(site: Path, installed: str) -> int:
    """Print the copyright file for guardd and everything in ``site`` but guardd."""
    out = [
        f"Format: {FORMAT}",
        "Upstream-Name: guardd",
        f"Source: {SOURCE}",
        "Comment: guardd bundles the Python distributions it runs on in /opt/guardd,",
        " a venv on Debian's python3. Their license files are installed beside them, in",
        f" /{installed}/<name>-<version>.dist-info/licenses/.",
        "",
        "Files: *",
        "Copyright: The guardd authors",
        "License: MIT",
        _body(MIT),
    ]
    for dist_info in sorted(site.glob("*.dist-info"), key=lambda p: p.name.lower()):
        meta = email.parser.Parser().parsestr((dist_info / "METADATA").read_text())
        if meta["Name"] == "guardd":
            continue
        out += ["", *_paragraph(dist_info, meta, installed)]
    print("\n".join(out))
    return 0


def _paragraph(dist_info: Path, meta: email.message.Message, installed: str) -> list[str]:
    """Return the Files paragraph of one bundled distribution."""
    texts = [
        p.read_text(errors="replace")
        for p in sorted((dist_info / "licenses").rglob("*"))
        if p.is_file()
    ]
    holders = sorted({m.group(1).strip() for t in texts for m in _copyright_lines(t)})
    if not holders:
        holders = [meta["Author-email"] or meta["Author"] or meta["Maintainer"] or meta["Name"]]
    files = " ".join(f"{installed}/{entry}" for entry in _top_entries(dist_info))
    body = "\n\n".join(_license_text(t) for t in texts) or MIT
    return [
        f"Files: {files}",
        "Copyright: " + "\n ".join(holders),
        f"License: {_license(meta)}",
        _body(body),
    ]


def _copyright_lines(text: str) -> list[re.Match[str]]:
    """Return the copyright statements of a license text."""
    return [m for line in text.splitlines() if (m := COPYRIGHT_LINE.match(line))]


def _top_entries(dist_info: Path) -> list[str]:
    """Return the top-level files and folders one distribution installs, as Files patterns."""
    rows = csv.reader(io.StringIO((dist_info / "RECORD").read_text()))
    entries = set()
    for row in rows:
        if not row:
            continue
        path = row[0]
        if path.startswith("../"):
            continue  # console scripts in bin/: covered by "Files: *" of the venv itself
        top, _, rest = path.partition("/")
        entries.add(f"{top}/*" if rest else top)
    return sorted(entries)


def _license(meta: email.message.Message) -> str:
    """Return the distribution's license as a copyright-format short name."""
    expression = meta["License-Expression"]
    if not expression and meta["License"] and "\n" not in meta["License"].strip():
        expression = meta["License"].strip()
    if not expression:
        found = [CLASSIFIERS[c] for c in meta.get_all("Classifier") or [] if c in CLASSIFIERS]
        expression = " OR ".join(found) if found else "UNKNOWN"
    return expression.replace(" OR ", " or ").replace(" AND ", " and ")


def _license_text(text: str) -> str:
    """Return a license file's text, or a pointer for one of Debian's common licenses."""
    for name, markers in COMMON.items():
        if all(marker in text for marker in markers):
            where = f"/usr/share/common-licenses/{name}"
            return f"On Debian systems, the full text of {name} is in {where}."
    return text


def _body(text: str) -> str:
    """Format a multi-line text as a copyright-format field continuation."""
    lines = text.strip("\n").splitlines()
    return "\n".join(f" {line.rstrip()}" if line.strip() else " ." for line in lines)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
