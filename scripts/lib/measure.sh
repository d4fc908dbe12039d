# Helpers of the scripts that print figures (scripts/measure-*): sourced, not run.

say() { printf '%s\n' "$*"; }
secs() { awk -v s="$1" 'BEGIN { if (s >= 60) printf "%dm%02ds", s / 60, s % 60; else printf "%ds", s }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
load() { say "  load: $(uptime | sed 's/.*load average/load average/'), $(nproc) cores"; }
# cpu: the user + system seconds of every finished child of this shell so far (bash's `times`),
# so a figure taken on a loaded machine can be read against the CPU time it took.
# Run by this shell itself (a pipe or $(...) would ask a fresh subshell, which has no children).
cpu() {
  local f
  f=$(mktemp)
  times >"$f"
  tail -n 1 "$f" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub(/s$/, "", p[2]); t += p[1] * 60 + p[2] } printf "%d\n", t }'
  rm -f "$f"
}

# timed LOG COMMAND...: runs COMMAND with each output line prefixed by the seconds since it
# started (in LOG), and prints the total seconds; on failure shows the log's end and exits.
timed() {
  local log=$1; shift
  local start=$EPOCHREALTIME
  "$@" 2>&1 | while IFS= read -r line; do
    printf '%7.1f %s\n' "$(awk -v a="$EPOCHREALTIME" -v b="$start" 'BEGIN { print a - b }')" "$line"
  done > "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "$(basename "$0"): '$*' failed (exit $rc); its log:" >&2; tail -n 40 "$log" >&2; exit 1; }
  awk -v a="$EPOCHREALTIME" -v b="$start" 'BEGIN { printf "%d\n", a - b }'
}

# phases LOG: the seconds between scripts/demo's steps (its '==>' lines), and the figures it
# prints of the two builds it runs side by side.
phases() {
  awk '/ ==> / { t = $1; sub(/^ *[0-9.]+ ==> /, ""); if (name != "") printf "    %6.0fs  %s\n", t - last, name; name = $0; last = t }
       END { printf "    %6.0fs  %s\n", $1 - last, name }' "$1"
  sed -n 's/^ *[0-9.]* \(cargo build: .*\|scripts\/build-tools cluster node images: .*\)$/      (\1)/p' "$1"
}
