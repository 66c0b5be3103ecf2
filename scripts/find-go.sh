#!/usr/bin/env bash
# Print the path of a Go toolchain that can build guest/agent: Go >= 1.21, which reads any
# go.mod and fetches the toolchain it names (GOTOOLCHAIN=auto). Exit 1 if there is none.
# Looks at every `go` on PATH in order (an old /usr/local/go or bookworm's 1.19 may come
# first), then at Debian's /usr/lib/go-1.*/bin/go, newest first.
set -euo pipefail
min_minor=21

# go1.23.4 / go1.21rc2 -> 23 / 21; anything else (devel builds) -> empty
minor_of() { sed -nE 's/^go1\.([0-9]+).*/\1/p' <<<"$1"; }

candidates() {
	local dir
	local -a dirs
	IFS=: read -ra dirs <<<"${PATH:-}"
	for dir in "${dirs[@]}"; do
		[ -n "$dir" ] && [ -x "$dir/go" ] && echo "$dir/go"
	done
	ls -1d /usr/lib/go-1.*/bin/go 2>/dev/null | sort -rV || true
}

while IFS= read -r go; do
	# GOTOOLCHAIN=local, outside any module: this binary's own version
	version="$(cd / && GOTOOLCHAIN=local "$go" env GOVERSION 2>/dev/null || true)"
	minor="$(minor_of "$version")"
	if [ -n "$minor" ] && [ "$minor" -ge "$min_minor" ]; then
		echo "$go"
		exit 0
	fi
	echo "find-go: skipping $go (${version:-version unknown}): need Go >= 1.$min_minor" >&2
done < <(candidates)
echo "find-go: no Go >= 1.$min_minor found on PATH or in /usr/lib/go-1.*" >&2
exit 1
