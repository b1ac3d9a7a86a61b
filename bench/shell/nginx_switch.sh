#!/usr/bin/env bash
# nginx_switch.sh LINK TARGET [-- NGINX_ARGS...] — the classic blue/green switch script.
#
# Points the symlink LINK at TARGET (a new link beside it, then an atomic rename),
# runs `nginx -t`, and reloads nginx; if nginx rejects the new target the old link is
# put back. NGINX_ARGS (e.g. `-p DIR/ -c nginx.conf`) go to both nginx commands.
set -eu

link=${1:?usage: nginx_switch.sh LINK TARGET [-- NGINX_ARGS...]}
target=${2:?usage: nginx_switch.sh LINK TARGET [-- NGINX_ARGS...]}
shift 2
[ "${1:-}" = "--" ] && shift
nginx=${NGINX:-nginx}

old=$(readlink "$link")
ln -sfn "$target" "$link.new"
mv -Tf "$link.new" "$link"
if ! "$nginx" -t -q "$@" 2>/dev/null; then
    ln -sfn "$old" "$link.new"
    mv -Tf "$link.new" "$link"
    echo "nginx rejected $target; kept $old" >&2
    exit 1
fi
"$nginx" -s reload "$@"
