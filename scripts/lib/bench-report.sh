# shellcheck shell=bash
# The benchmarks' reports in docs/performance.md: each bench prints markdown, and with
# `--write FILE` it also replaces its own section of FILE, the lines between
# `<!-- NAME:begin -->` and `<!-- NAME:end -->`, so the page holds the figures of the last run of
# each bench next to the text around them.

# bench_write_section FILE NAME REPORT: put the contents of REPORT between NAME's markers in FILE.
bench_write_section() {
  local file=$1 name=$2 report=$3
  [ -f "$file" ] || { echo "bench: $file does not exist; create it with the markers <!-- $name:begin --> and <!-- $name:end -->" >&2; return 1; }
  grep -qxF "<!-- $name:begin -->" "$file" && grep -qxF "<!-- $name:end -->" "$file" ||
    { echo "bench: $file has no section <!-- $name:begin --> ... <!-- $name:end -->; add the two lines where the figures go" >&2; return 1; }
  awk -v begin="<!-- $name:begin -->" -v end="<!-- $name:end -->" -v report="$report" '
    $0 == begin { print; while ((getline line < report) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip { print }' "$file" > "$file.tmp" && mv "$file.tmp" "$file"
  echo "bench: wrote the figures into $file (section $name)" >&2
}

# The machine and its load, one markdown line, for the head of a report.
bench_machine_line() {
  printf 'Machine: %s cores (%s), %s; %s. Load average (1/5/15 min) now: %s.\n' "$(nproc)" \
    "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" \
    "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)" \
    "$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), kernel $(uname -r)" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
}
