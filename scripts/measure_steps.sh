# Sourced by scripts/*_measurements.sh: $OUT, the environment, and `step NAME SECONDS CMD...`,
# which runs CMD under its own time limit into $OUT/NAME.txt and logs its exit status.
# With PACK=FILE.tgz, $OUT is packed into FILE after every step (a machine that returns
# few files, or a run cut short, still brings back every finished step).
OUT=${OUT:-measurements}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PY:-python3}
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  if [ -n "${PACK:-}" ]; then tar czf "$PACK" -C "$OUT" .; fi
}
