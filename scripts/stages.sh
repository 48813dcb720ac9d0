# The build stages of the test suite, shared by test.sh and soak-tests.sh (sourced, with
# $root set). Each stage is a build folder with its own CMake options and its own selection
# of tests; its configure log goes inside the folder.
#   plain     Release, the whole suite
#   openblas  Release with SHARDPROP_USE_OPENBLAS, the unit tests (the allocation-free step
#             among them)
#   sanitize  AddressSanitizer and UndefinedBehaviorSanitizer, the whole suite
# BUILD_DIR (default $root/build) names the plain stage's folder; the others add a suffix.

stage_dir() {
  local base=${BUILD_DIR:-$root/build}
  case $1 in
    plain) echo "$base" ;;
    openblas) echo "$base-openblas" ;;
    sanitize) echo "$base-sanitize" ;;
    *) echo "unknown stage '$1'" >&2; return 2 ;;
  esac
}

# stage_build NAME: configures and builds the stage's folder.
stage_build() {
  local dir options=()
  dir=$(stage_dir "$1")
  case $1 in
    plain) options=(-DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}") ;;
    openblas) options=(-DCMAKE_BUILD_TYPE=Release -DSHARDPROP_USE_OPENBLAS=ON) ;;
    sanitize) options=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHARDPROP_SANITIZE=ON) ;;
  esac
  mkdir -p "$dir"
  cmake -S "$root" -B "$dir" "${options[@]}" > "$dir/configure.log" 2>&1 ||
    { cat "$dir/configure.log"; return 1; }
  cmake --build "$dir" -j "$(nproc)"
}

# stage_ctest NAME [CTEST FLAGS...]: runs the stage's tests.
stage_ctest() {
  local dir select=()
  dir=$(stage_dir "$1")
  [ "$1" = openblas ] && select=(-E '^(mpi_np|e2e_)')
  (cd "$dir" && ctest -j "$(nproc)" "${select[@]}" "${@:2}")
}
