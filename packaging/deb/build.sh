#!/usr/bin/env bash
# Builds dist/guardd_<version>_<arch>.deb: guardd and every Python dependency in a venv at
# /opt/guardd on Debian's own /usr/bin/python3, so the package installs without a network.
#
#   packaging/deb/build.sh [OUT_DIR]      (default OUT_DIR: dist/)
#
# Environment: UV (the uv binary, default `uv` on PATH), GUARDD_DEB_WORKDIR (the scratch
# tree, default build/deb; emptied first), GUARDD_DEB_MAINTAINER, SOURCE_DATE_EPOCH (default:
# the last commit's time, so two builds of one commit are byte for byte the same).
# The layout, the maintainer scripts and the lintian results are described in packaging/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
project=$(cd "$here/../.." && pwd)
out_dir=$(mkdir -p "${1:-$project/dist}" && cd "${1:-$project/dist}" && pwd)
work=${GUARDD_DEB_WORKDIR:-$project/build/deb}
uv=${UV:-uv}
maintainer=${GUARDD_DEB_MAINTAINER:-The guardd authors <guardd@example.org>}
python=/usr/bin/python3
prefix=/opt/guardd

die() { echo "build.sh: $*" >&2; exit 1; }

# ---- tools --------------------------------------------------------------------------------
need=()
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v help2man >/dev/null || need+=(help2man)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${need[*]} (install them, or run as root)"
    echo "build.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v "$uv" >/dev/null || die "uv not found (run \`make bootstrap\`, or set UV=/path/to/uv)"
# The venv must run on the interpreter the package depends on: Debian's python3.11.
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11) and sys.prefix == "/usr"' 2>/dev/null ||
    die "$python is not Debian's Python 3.11; build on Debian 12 (bookworm)"

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$project/guardd/_version.py")
[ -n "$version" ] || die "no __version__ in guardd/_version.py"
arch=$(dpkg --print-architecture)
pyver=python3.11
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$project" log -1 --format=%ct 2>/dev/null || stat -c %Y "$project/pyproject.toml")
fi
export SOURCE_DATE_EPOCH
# uv settings of the person building must not change what goes into the package.
export UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_NO_CONFIG=1
unset UV_COMPILE_BYTECODE UV_SYSTEM_PYTHON VIRTUAL_ENV
# Bytecode is compiled by postinst on the target, never shipped (it would name build paths).
export PYTHONDONTWRITEBYTECODE=1
export COLUMNS=80 LC_ALL=C.UTF-8 TZ=UTC

root=$work/root
venv=$root$prefix
rm -rf "$work"
mkdir -p "$root/DEBIAN" "$work/wheels"
umask 022
started=$(date +%s)

# ---- the venv -----------------------------------------------------------------------------
# Dependencies exactly as locked, checked against the lock's hashes; guardd's own wheel
# from this tree, installed by name from a local folder so no build path is recorded.
(cd "$project" && "$uv" export --quiet --frozen --no-dev --no-emit-project \
    --format requirements-txt --output-file "$work/requirements.txt")
"$uv" build --quiet --wheel --out-dir "$work/wheels" "$project"
"$python" -m venv --without-pip "$venv"
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps --require-hashes \
    --requirement "$work/requirements.txt"
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps --no-index \
    --find-links "$work/wheels" "guardd==$version"
"$venv/bin/python" -c 'import guardd.cli, guardd.ctl' || die "the venv cannot import guardd"

# Manual pages from --help, while the entry points still run from the build tree.
mkdir -p "$root/usr/share/man/man1"
help2man --no-info --no-discard-stderr --version-string="$version" \
    --name="guard blue/green upstreams behind nginx and roll back a failing color" \
    --output="$root/usr/share/man/man1/guardd.1" "$venv/bin/guardd"
help2man --no-info --no-discard-stderr --version-string="$version" \
    --name="operate a running guardd: status, history, switch, rollback, QoS lock" \
    --output="$root/usr/share/man/man1/guardctl.1" "$venv/bin/guardctl"
gzip -9n "$root/usr/share/man/man1/"*.1

# Paths in the venv name the build tree until they are moved to /opt/guardd.
"$python" "$here/relocate.py" "$venv" "$prefix"
rm -f "$venv/.lock"  # uv's own lock file, not part of a venv
rm -rf "$venv/include"  # empty: nothing here builds C extensions
find "$venv" -depth -type d -name __pycache__ -exec rm -rf {} +
# Modules some wheels mark executable without a #! line (certifi's tests) are no programs.
find "$venv/lib" -type f -perm /111 ! -name '*.so' ! -name '*.so.*' -print0 |
    while IFS= read -r -d '' file; do
        [ "$(head -c 2 "$file")" = '#!' ] || chmod a-x "$file"
    done

# ---- everything else ----------------------------------------------------------------------
mkdir -p "$root/usr/bin"
for command in guardd guardctl; do
    ln -s "$prefix/bin/$command" "$root/usr/bin/$command"
done
# bookworm's debhelper still installs units into /lib (DEP 17 keeps them there until trixie).
mkdir -p "$root/lib/systemd/system"
for unit in "$project"/systemd/*.service "$project"/systemd/*.target; do
    [ -e "$unit" ] && install -m 0644 "$unit" "$root/lib/systemd/system/"
done
users=""
for kind in sysusers.d tmpfiles.d; do
    if [ -e "$project/systemd/$kind/guardd.conf" ]; then
        install -D -m 0644 "$project/systemd/$kind/guardd.conf" "$root/usr/lib/$kind/guardd.conf"
    fi
done
if [ -e "$root/usr/lib/sysusers.d/guardd.conf" ]; then
    # The users and groups purge removes: what sysusers.d declares ('u' and 'g' lines).
    users=$(awk '$1 == "u" || $1 == "g" { print $1 ":" $2 }' "$root/usr/lib/sysusers.d/guardd.conf" | xargs)
fi
install -D -m 0644 "$project/config/example.toml" "$root/etc/guardd/example.toml"

doc=$root/usr/share/doc/guardd
mkdir -p "$doc"
"$python" "$here/copyright.py" "$venv/lib/$pyver/site-packages" "${prefix#/}/lib/$pyver/site-packages" \
    >"$doc/copyright"
{
    echo "guardd ($version) stable; urgency=medium"
    echo
    echo "  * guardd $version with its Python dependencies in $prefix."
    echo "    What changed in this release: /usr/share/doc/guardd/CHANGELOG.md.gz."
    echo
    echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
gzip -9n <"$project/CHANGELOG.md" >"$doc/CHANGELOG.md.gz"
# The log_format the access_log signal reads, for nginx's http { } block.
install -D -m 0644 "$project/packaging/nginx/guardd-log-format.conf" \
    "$doc/examples/nginx/guardd-log-format.conf"
install -D -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/guardd"

# ---- control ------------------------------------------------------------------------------
for script in postinst prerm postrm; do
    sed -e "s|@USERS@|$users|g" "$here/$script" >"$root/DEBIAN/$script"
    chmod 0755 "$root/DEBIAN/$script"
done
install -m 0644 "$here/conffiles" "$root/DEBIAN/conffiles"
# Shared-library dependencies of the compiled wheels (pydantic-core), as dh_shlibdeps finds them.
mkdir -p "$work/shlibs/debian"
printf 'Source: guardd\n\nPackage: guardd\nArchitecture: any\n' >"$work/shlibs/debian/control"
mapfile -t elves < <(find "$venv" -type f -name '*.so*' | LC_ALL=C sort)
shlibs=""
if [ ${#elves[@]} -gt 0 ]; then
    shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O --warnings=0 "${elves[@]}" |
        sed -n 's/^shlibs:Depends=//p')
fi
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@SHLIBS@|${shlibs:+, $shlibs}|" \
    "$here/control.in" >"$root/DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' |
    LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

# Same modes and times on every build: dpkg-deb sets the owners (--root-owner-group).
find "$root" -type d -exec chmod 0755 {} +
find "$root" -type f -exec chmod go-w,u+w {} +
find "$root" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +

deb=$out_dir/guardd_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "build.sh: $deb ($(du -h "$deb" | cut -f1), $(( $(date +%s) - started )) s)"
