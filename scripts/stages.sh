# The build stages of the test suite, shared by test.sh and soak-tests.sh (sourced, with
# $root set). Each stage is a build folder with its own CMake options and its own selection
# of tests; its configure log goes inside the folder.
#   plain     Release, the whole suite
#   openblas  the plain build's unit tests again with every product by OpenBLAS
#             (SHARDPROP_GEMM=openblas) instead of the default backend
#   sanitize  AddressSanitizer and UndefinedBehaviorSanitizer, the whole suite
# BUILD_DIR (default $root/build) names the plain stage's folder; the others add a suffix.

stage_dir() {
  local base=${BUILD_DIR:-$root/build}
  case $1 in
    plain) echo "$base" ;;
    openblas) echo "$base" ;;
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
    openblas) options=(-DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}") ;;
    sanitize) options=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHARDPROP_SANITIZE=ON) ;;
  esac
  mkdir -p "$dir"
  cmake -S "$root" -B "$dir" "${options[@]}" > "$dir/configure.log" 2>&1 ||
    { cat "$dir/configure.log"; return 1; }
  cmake --build "$dir" -j "$(nproc)"
}

# stage_ctest NAME [CTEST FLAGS...]: runs the stage's tests.
stage_ctest() {
  local dir
  dir=$(stage_dir "$1")
  if [ "$1" = openblas ]; then
    (cd "$dir" && SHARDPROP_GEMM=openblas ctest -j "$(nproc)" -E '^(mpi_np|e2e_|slurm$)' "${@:2}")
  else
    (cd "$dir" && ctest -j "$(nproc)" "${@:2}")
  fi
}
