#!/usr/bin/env bash
# The installed library works for another project: `cmake --install` into a fresh prefix,
# then a consumer project elsewhere finds it with find_package(shardprop), builds against
# its public headers only, and trains, checkpoints and resumes a small model through it.
# The exported package names its dependencies by find_dependency, never by this build
# machine's library paths.
# usage: consumer_test.sh BUILD_DIR MPIEXEC [MPIEXEC FLAGS...]
# Environment: CONSUMER_CXX_FLAGS, compile and link flags of the consumer (the sanitizers of
# a sanitizer build).
set -euo pipefail
build=$1
shift
mpirun=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cmake --install "$build" --prefix "$work/prefix" > "$work/install.log"
targets=$(find "$work/prefix" -name 'shardpropTargets*.cmake')
if grep -h "INTERFACE_LINK_LIBRARIES" $targets | grep -qE '/usr/lib|\.so'; then
  echo "FAIL: the exported targets link libraries by path:"
  grep -h "INTERFACE_LINK_LIBRARIES" $targets
  exit 1
fi
if find "$work/prefix/include" -name 'h5.hpp' -o -name 'gemm.hpp' | grep -q .; then
  echo "FAIL: private headers were installed"
  exit 1
fi

mkdir -p "$work/consumer"
cat > "$work/consumer/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.22)
project(consumer LANGUAGES C CXX)
find_package(shardprop REQUIRED)
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE shardprop::shardprop)
CMAKE
cat > "$work/consumer/main.cpp" <<'CPP'
// Trains a small model on two Gaussian blobs, checkpoints it, resumes from the checkpoint.
#include <mpi.h>

#include <cstdio>

#include "shardprop/checkpoint.hpp"
#include "shardprop/comm.hpp"
#include "shardprop/rng.hpp"
#include "shardprop/train.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    namespace sp = shardprop;
    sp::MpiComm comm(MPI_COMM_WORLD);
    sp::Dataset data;
    data.rows = 400;
    data.cols = 4;
    sp::Rng rng(3);
    for (std::size_t r = 0; r < data.rows; ++r) {
      const int label = int(r % 2);
      data.labels.push_back(label);
      for (std::size_t c = 0; c < data.cols; ++c) {
        data.features.push_back(float((label ? 1.5 : -1.5) + rng.normal()));
      }
    }
    sp::Settings s;
    s.layers = "4,8:relu,2:softmax";
    s.batch = 40;
    s.epochs = 3;
    s.lr = 0.1;
    sp::Trainer trainer(s, comm, data);
    sp::TrainObserver quiet;
    trainer.run(nullptr, quiet);
    const sp::EvalStats e = trainer.evaluate(data);
    if (comm.rank() == 0) sp::save_checkpoint(argv[1], trainer.checkpoint());
    const sp::Checkpoint c = sp::load_shared(comm, argv[1], "--resume");
    sp::Trainer resumed(s, comm, data);
    resumed.restore(c);
    if (comm.rank() == 0) {
      std::printf("accuracy %.3f, resumed at step %llu\n", e.accuracy,
                  (unsigned long long)resumed.state().step);
    }
    status = e.accuracy > 0.9 && resumed.state().step == 30 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
CPP
cmake -S "$work/consumer" -B "$work/consumer/build" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_CXX_FLAGS="${CONSUMER_CXX_FLAGS:-}" -DCMAKE_EXE_LINKER_FLAGS="${CONSUMER_CXX_FLAGS:-}" \
  > "$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/consumer/build" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"${mpirun[@]}" -np 2 "$work/consumer/build/consumer" "$work/model.h5" | tee "$work/run.txt"
grep -q "resumed at step 30" "$work/run.txt"
echo "consumer_test: the installed package builds and runs a consumer"
