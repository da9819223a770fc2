#!/usr/bin/env bash
# The fresh-machine check (CI runs it after the tests): README's first command, the part
# after `bash scripts/install.sh &&`, exactly as README.md writes it, must print the
# version and write a video that decodes, with as many frames as its input.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX='    bash scripts/install.sh && '
line=$(grep -m1 -F "$PREFIX" README.md) || {
  echo "check_fresh.sh: README.md has no '${PREFIX# *}...' command" >&2
  exit 1
}
cmd=${line#"$PREFIX"}
bin=$(dirname "$(printf '%s\n' "$cmd" | awk '{print $1}')")
"$bin/diffstream" --version
out=$("$bin/python" -c 'import shlex, sys; a = shlex.split(sys.argv[1]); print(a[a.index("-o") + 1])' "$cmd")
rm -f "$out"
echo "check_fresh.sh: $cmd"
bash -c "$cmd"
"$bin/python" - "$cmd" <<'PY'
import shlex
import sys

import av

args = shlex.split(sys.argv[1])
source, output = args[args.index("run") + 1], args[args.index("-o") + 1]


def count(path):
    with av.open(path) as container:
        return container.format.name, sum(1 for _ in container.decode(video=0))


_, want = count(source)
fmt, got = count(output)
assert "mp4" in fmt, f"{output} is {fmt}, not an mp4"
assert got == want, f"{output} has {got} frames, {source} has {want}"
print(f"check_fresh.sh: ok: {output} decodes, {got} frames like {source}")
PY
