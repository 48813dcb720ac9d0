// Writes checkpoints into a directory as fast as it can, continuing after the newest one
// there, until it is killed. checkpoint_test kills it at moments it derives from what this
// program reports, then checks that the directory still holds a newest checkpoint that
// loads and verifies.
// usage: checkpoint_writer DIR [FD]
// With FD, every write is reported on that file descriptor as two lines, "S <step>" just
// before CheckpointDir::write starts and "E <step>" once it has returned, so the killer can
// tell how long a write takes on this machine and whether a kill landed inside one.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "shardprop/checkpoint.hpp"

namespace {

// One line to `fd` (-1: none); a short or failed write ends the program with an error.
void report(int fd, char kind, std::uint64_t step) {
  if (fd < 0) return;
  const std::string line = std::string(1, kind) + " " + std::to_string(step) + "\n";
  if (::write(fd, line.data(), line.size()) != ssize_t(line.size())) {
    std::fprintf(stderr, "checkpoint_writer: cannot report to fd %d\n", fd);
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  namespace sp = shardprop;
  if (argc != 2 && argc != 3) {
    std::fprintf(stderr, "usage: checkpoint_writer DIR [FD]\n");
    return 2;
  }
  const int fd = argc == 3 ? std::atoi(argv[2]) : -1;
  try {
    sp::CheckpointDir dir(argv[1], 2);
    const std::vector<std::string> existing = sp::list_checkpoints(argv[1]);
    std::uint64_t step = existing.empty() ? 0 : sp::load_checkpoint(existing.front()).state.step;
    sp::Checkpoint c;
    c.spec = sp::parse_model("784,256:relu,10:softmax", "xent");
    const sp::Layout layout(c.spec);
    c.has_training_state = true;
    c.train_rows = 1000;
    c.train_cols = 784;
    c.world_size = c.threads = 1;
    c.settings.layers = c.spec.layers_string();
    c.params.assign(layout.size(), 0.0f);
    c.optimizer_state.assign(layout.size(), 0.0f);
    for (int i = 0; i < 100000; ++i) {
      ++step;
      // Contents that identify the step, so a reader can tell files apart.
      for (std::size_t j = 0; j < layout.size(); ++j) c.params[j] = float(step) + float(j % 97);
      for (std::size_t j = 0; j < layout.size(); ++j) c.optimizer_state[j] = -float(step);
      c.state.step = c.optimizer_steps = step;
      c.state.epoch = step / 4;
      c.state.batch_in_epoch = step % 4;
      c.settings.batch = 250;
      report(fd, 'S', step);
      dir.write(c);
      report(fd, 'E', step);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "checkpoint_writer: %s\n", e.what());
    return 1;
  }
  return 0;
}
