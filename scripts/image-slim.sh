#!/usr/bin/env bash
# Leaves in the image root ROOT only what runs there: the packages of
# manifests/image-packages, coreutils (the init containers' `cp`), dash (a
# /bin/sh for `kubectl exec`), base-files/base-passwd, and the libraries they
# link. The rest of Debian's essential set (perl, bash, dpkg itself, debconf,
# util-linux, ...) was only needed to install those and is purged with dpkg; its
# database stays and stays true, so image scanners see exactly what is there.
# Then checks that every program the agent execs still starts.
# Called by scripts/image.sh as an mmdebstrap customize hook.
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")/.." && pwd)
keep_roots="$(sed 's/#.*//' "$here/manifests/image-packages" | xargs) coreutils dash base-files base-passwd"

# Installed packages and their Depends/Pre-Depends (first installed alternative).
keep=$(awk -v roots="$keep_roots" '
  function flush() { if (pkg != "" && ok) { installed[pkg] = 1; deps[pkg] = d } pkg = ""; d = ""; ok = 0 }
  /^Package: / { flush(); pkg = $2 }
  /^Status: install ok installed/ { ok = 1 }
  /^(Pre-)?Depends: / { sub(/^[^:]*: /, ""); d = d ", " $0 }
  END {
    flush()
    n = split(roots, q, " ")
    for (i = 1; i <= n; i++) if (q[i] in installed) seen[q[i]] = 1
    changed = 1
    while (changed) {
      changed = 0
      for (p in seen) {
        if (done[p]) continue
        done[p] = 1
        m = split(deps[p], alts, ",")
        for (j = 1; j <= m; j++) {
          k = split(alts[j], choice, "|")
          for (c = 1; c <= k; c++) {
            name = choice[c]; gsub(/\(.*\)|:[a-z0-9]+|[[:space:]]/, "", name)
            if (name in installed) {
              # Only what a program needs to run: its libraries (and their data).
              # Anything else a package depends on (debconf, openssl for
              # ca-certificates, debianutils for dash) runs at install time only.
              if (name ~ /^(lib|gcc-[0-9]+-base$|netbase$)/ && !(name in seen)) { seen[name] = 1; changed = 1 }
              break
            }
          }
        }
      }
    }
    for (p in seen) print p
  }' "$root/var/lib/dpkg/status" | sort)

mapfile -t all < <(chroot "$root" dpkg-query -W -f='${Package}\n' | sort)
purge=()
for p in "${all[@]}"; do
  grep -qx "$p" <<<"$keep" || purge+=("$p")
done
# One dpkg run (its own package last: it checks for tar, diff and ldconfig at
# start, which go in the same run). The maintainer scripts of what goes would
# need the perl and shell tools going with them, and only tidy their own files.
others=()
for p in "${purge[@]}"; do [ "$p" = dpkg ] || others+=("$p"); done
printf '%s\n' "${purge[@]}" | grep -qx dpkg && others+=(dpkg)
for p in "${purge[@]}"; do rm -f "$root/var/lib/dpkg/info/$p".{prerm,postrm} "$root/var/lib/dpkg/info/$p:"*.{prerm,postrm}; done
force=(--force-remove-essential --force-remove-protected --force-depends)
log=$(mktemp)
if [ ${#others[@]} -gt 0 ] && ! chroot "$root" dpkg --purge "${force[@]}" "${others[@]}" >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
# Left by what was purged (apt's caches in a base image that had apt), and what
# no program here reads (scripts/image.sh already keeps these out via dpkg's path-exclude).
rm -rf "$root"/var/cache/apt "$root"/var/lib/apt "$root"/var/cache/debconf "$root"/var/lib/dpkg/*-old \
  "$root"/var/log/* "$root"/usr/share/lintian "$root"/usr/share/doc/* "$root"/usr/share/man/* \
  "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/usr/lib/x86_64-linux-gnu/gconv
echo "image-slim: kept ${keep//$'\n'/ }"
echo "image-slim: purged ${purge[*]}"

# What the agent and the init containers run must still start.
for cmd in "cp --version" "sh -c true" "iptables-nft-save --version" "iptables-legacy-save --version" \
           "ip6tables-nft-restore --version" "iptables --version" "nft --version"; do
  chroot "$root" $cmd >/dev/null || { echo "image-slim: '$cmd' no longer runs in the image" >&2; exit 1; }
done
[ -s "$root/etc/ssl/certs/ca-certificates.crt" ] || { echo "image-slim: CA bundle missing" >&2; exit 1; }
