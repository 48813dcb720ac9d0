// Writes checkpoints into a directory as fast as it can, continuing after the newest one
// there, until it is killed. checkpoint_test kills it at random moments and then checks
// that the directory still holds a newest checkpoint that loads and verifies.
// usage: checkpoint_writer DIR
#include <cstdio>
#include <exception>

#include "shardprop/checkpoint.hpp"

int main(int argc, char** argv) {
  namespace sp = shardprop;
  if (argc != 2) {
    std::fprintf(stderr, "usage: checkpoint_writer DIR\n");
    return 2;
  }
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
      c.config.batch = 250;
      dir.write(c);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "checkpoint_writer: %s\n", e.what());
    return 1;
  }
  return 0;
}
