#include "report.hpp"

#include <cstdio>
#include <filesystem>

#include "shardprop/error.hpp"

namespace shardprop::app {

std::string thousands(std::uint64_t n) {
  const std::string digits = std::to_string(n);
  std::string s;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) s.push_back(',');
    s.push_back(digits[i]);
  }
  return s;
}

std::string count_of(std::uint64_t n, const std::string& noun, const std::string& plural) {
  return thousands(n) + " " + (n == 1 ? noun : plural.empty() ? noun + "s" : plural);
}

std::string clock_time(double seconds) {
  const auto total = static_cast<long long>(seconds + 0.5);
  char text[32];
  if (total >= 3600) {
    std::snprintf(text, sizeof text, "%lld:%02lld:%02lld", total / 3600, total / 60 % 60, total % 60);
  } else {
    std::snprintf(text, sizeof text, "%lld:%02lld", total / 60, total % 60);
  }
  return text;
}

Reporter::Reporter(bool speak, bool progress, int ranks, int threads,
                   const std::string& metrics_path, bool append)
    : speak_(speak), progress_(speak && progress), ranks_(ranks), threads_(threads) {
  if (speak_ && !metrics_path.empty()) {
    metrics_.open(metrics_path, append ? std::ios::app : std::ios::trunc);
    SP_CHECK(metrics_, "--metrics: cannot write '", metrics_path, "'");
    metrics_path_ = metrics_path;
  }
}

void Reporter::on_progress(const Progress& p) {
  if (!progress_) return;
  const auto now = std::chrono::steady_clock::now();
  if (p.batch != p.batches && now - last_ < std::chrono::milliseconds(200)) return;
  last_ = now;
  constexpr int kWidth = 24;
  const int filled = int(kWidth * p.batch / p.batches);
  // Both estimates at this epoch's pace so far; the run's leaves out the evaluations.
  std::printf("\repoch %llu/%llu [%-*s] %llu/%llu loss %.4f  lr %.3g  %s samples/s  ETA epoch "
              "%s, run %s ",
              (unsigned long long)p.epoch, (unsigned long long)p.epochs, kWidth,
              std::string(std::size_t(filled), '#').c_str(), (unsigned long long)p.batch,
              (unsigned long long)p.batches, p.running_loss, p.lr,
              thousands(std::uint64_t(p.samples_per_s)).c_str(),
              clock_time(double(p.batches - p.batch) * p.step_seconds).c_str(),
              clock_time(double(p.total_steps - p.step) * p.step_seconds).c_str());
  std::fflush(stdout);
}

void Reporter::clear_line() const {
  if (progress_) std::printf("\r\033[K");
}

void Reporter::on_epoch(const EpochStats& s) {
  if (!speak_) return;
  clear_line();
  std::printf("epoch %3llu/%llu  step %7llu  train_loss %.4f  train_acc %.4f",
              (unsigned long long)s.epoch, (unsigned long long)s.epochs,
              (unsigned long long)s.step, s.train.loss, s.train.accuracy);
  if (s.has_val) {
    std::printf("  val_loss %.4f  val_acc %.4f%s", s.val.loss, s.val.accuracy, s.best ? "*" : " ");
  }
  if (s.has_test) std::printf("  test_loss %.4f  test_acc %.4f", s.test.loss, s.test.accuracy);
  if (s.clipped > 0) std::printf("  clipped %llu", (unsigned long long)s.clipped);
  std::printf("  lr %.3g  samples/s %8.0f  %.2fs\n", s.lr, s.samples_per_s, s.seconds);
  std::fflush(stdout);
  if (metrics_.is_open()) {
    metrics_ << metrics_json(s, ranks_, threads_) << '\n';
    metrics_.flush();
    SP_CHECK(metrics_, "--metrics: writing '", metrics_path_, "' failed");
  }
}

void Reporter::on_checkpoint(const std::string& path) {
  if (!speak_ || path.empty()) return;
  last_checkpoint_ = path;
  clear_line();
  std::printf("checkpoint %s\n", path.c_str());
  std::fflush(stdout);
}

void Reporter::on_save(const std::string& path) {
  if (!speak_ || path.empty()) return;
  clear_line();
  std::printf("saved %s\n", path.c_str());
  std::fflush(stdout);
}

namespace {

// "cosine decay, 100 warmup steps, scaled by batch 256/128" for the header and `info`.
std::string schedule_text(const Settings& s) {
  std::string text;
  const auto add = [&](const std::string& part) { text += (text.empty() ? "" : ", ") + part; };
  if (s.lr_schedule == "cosine" || s.lr_schedule == "linear") add(s.lr_schedule + " decay");
  if (s.lr_schedule == "step") {
    add("times " + format_setting(setting("--lr-decay"), s) + " every " + s.lr_milestones +
        " epochs");
  }
  if (s.lr_schedule == "multistep") {
    add("times " + format_setting(setting("--lr-decay"), s) + " at epochs " + s.lr_milestones);
  }
  if (s.warmup_steps > 0) add(count_of(s.warmup_steps, "warmup step"));
  if (s.lr_scale_batch > 0) {
    add("scaled by batch " + std::to_string(s.batch) + "/" + std::to_string(s.lr_scale_batch));
  }
  return text.empty() ? text : " (" + text + ")";
}

void print_optimizer(const Settings& s) {
  std::printf("  optimizer  %s lr %g%s", s.optimizer.c_str(), s.lr, schedule_text(s).c_str());
  if (s.optimizer == "sgd") std::printf(" momentum %g", s.momentum);
  if (s.optimizer == "adam") std::printf(" beta1 %g beta2 %g eps %g", s.beta1, s.beta2, s.eps);
  if (s.weight_decay > 0) std::printf(" weight_decay %g", s.weight_decay);
  if (s.clip_norm > 0) std::printf(" clip_norm %g", s.clip_norm);
}

std::string ranks_text(std::int64_t ranks, std::int64_t threads) {
  return count_of(std::uint64_t(ranks), "rank") + " x " + count_of(std::uint64_t(threads), "thread");
}

}  // namespace

void print_run_header(const RunHeader& run, const Trainer& trainer, const Dataset* test,
                      const Checkpointer& checkpointer) {
  const Settings& s = trainer.settings();
  const ModelSpec& spec = trainer.spec();
  std::printf("shardprop train: %s per rank, matrix products by %s\n",
              ranks_text(run.ranks, run.threads).c_str(), run.gemm.c_str());
  if (run.threads > run.cores) {
    std::printf("  note       %s on %s per rank (as mpirun bound it): the threads share them\n",
                count_of(std::uint64_t(run.threads), "thread").c_str(),
                count_of(std::uint64_t(run.cores), "core").c_str());
  }
  if (s.precision == "bf16") {
    std::printf("  precision  bf16 products (bfloat16 operands, float32 sums); weights, "
                "gradients and checkpoints float32\n");
  }
  std::printf("  model      %s, loss %s, %s parameters\n", spec.layers_string().c_str(),
              s.loss.c_str(), thousands(spec.parameter_count()).c_str());
  const Dataset& train = trainer.train_data();
  const auto held = [&](const Dataset& d) {
    return d.partitioned() ? " (" + thousands(d.rows) + " on this rank)" : std::string();
  };
  std::printf("  train      %s: %s samples x %zu features%s\n", s.train.c_str(),
              thousands(train.global_rows()).c_str(), train.cols, held(train).c_str());
  if (test) {
    std::printf("  test       %s: %s samples x %zu features%s\n", s.test.c_str(),
                thousands(test->global_rows()).c_str(), test->cols, held(*test).c_str());
  }
  const std::string patience =
      s.early_stop_patience > 0
          ? ", stopping after " + count_of(s.early_stop_patience, "epoch") + " without a better " +
                s.monitor
          : ", best by " + s.monitor;
  if (run.val) {
    std::printf("  val        %s: %s samples%s%s\n", s.val.c_str(),
                thousands(run.val->global_rows()).c_str(), held(*run.val).c_str(),
                patience.c_str());
  } else if (!trainer.held_out().empty()) {
    std::printf("  val        %s samples of the training set held out (--val-fraction %g)%s\n",
                thousands(trainer.held_out().size()).c_str(), s.val_fraction, patience.c_str());
  }
  std::size_t fewest = s.batch, most = 0;
  for (int r = 0; r < run.ranks; ++r) {
    const std::size_t rows = shard_range(s.batch, r, run.ranks, s.deterministic_chunk()).size();
    fewest = std::min(fewest, rows);
    most = std::max(most, rows);
  }
  std::string split;
  if (run.ranks > 1) {
    split = fewest == most ? " (" + std::to_string(most) + " per rank)"
                           : " (" + std::to_string(fewest) + "-" + std::to_string(most) + " per rank)";
  }
  if (s.accumulate > 1) {
    split += " in " + std::to_string(s.accumulate) + " micro-batches of " +
             std::to_string(s.batch / s.accumulate);
  }
  std::printf("  batch      %s global%s, %s per epoch, %s\n", thousands(s.batch).c_str(),
              split.c_str(), count_of(trainer.batches_per_epoch(), "step").c_str(),
              count_of(s.epochs, "epoch").c_str());
  if (run.ranks > 1) {
    std::printf("  reduction  %s\n", trainer.reduces_in_node_memory()
                                         ? "node: through shared memory, each rank updating its "
                                           "share of the parameters"
                                         : "mpi: MPI_Iallreduce, every rank updating all parameters");
  }
  if (s.deterministic) {
    std::printf("  mode       deterministic, chunks of %llu rows: the same bits for any ranks and "
                "threads\n", (unsigned long long)s.chunk);
  }
  print_optimizer(s);
  std::printf(", seed %llu\n", (unsigned long long)s.seed);
  if (const auto& c = checkpointer.resumed()) {
    const TrainState& st = c->state;
    if (st.epoch >= s.epochs) {
      std::printf("  resume     %s: step %llu, all %s done", checkpointer.resumed_path().c_str(),
                  (unsigned long long)st.step, count_of(s.epochs, "epoch").c_str());
    } else {
      std::printf("  resume     %s: step %llu, epoch %llu, batch %llu of %zu",
                  checkpointer.resumed_path().c_str(), (unsigned long long)st.step,
                  (unsigned long long)st.epoch + 1, (unsigned long long)st.batch_in_epoch,
                  trainer.batches_per_epoch());
    }
    std::printf("; written by %s\n", ranks_text(c->world_size, c->threads).c_str());
    for (const std::string& change : checkpointer.changed()) std::printf("  changed    %s\n", change.c_str());
    if (!checkpointer.restored().empty()) {
      std::printf("  restored  ");
      for (const std::string& r : checkpointer.restored()) std::printf(" %s", r.c_str());
      std::printf("\n");
    }
  }
  if (checkpointer.writing()) {
    std::printf("  checkpoint %s", s.checkpoint_dir.c_str());
    if (s.checkpoint_every_steps > 0) {
      std::printf(", every %s", count_of(s.checkpoint_every_steps, "step").c_str());
    }
    if (s.checkpoint_every_epochs > 0) {
      std::printf(", every %s", count_of(s.checkpoint_every_epochs, "epoch").c_str());
    }
    std::printf(", at the end; keeping %llu\n", (unsigned long long)s.keep_checkpoints);
  }
  std::fflush(stdout);
}

void print_checkpoint(const std::string& path, const Checkpoint& c) {
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(path, ec);
  const double kb = ec ? 0.0 : double(bytes) / 1e3;
  std::printf("%s: shardprop checkpoint, format_version %lld, %.1f %s\n", path.c_str(),
              (long long)c.format_version, kb < 1e3 ? kb : kb / 1e3, kb < 1e3 ? "kB" : "MB");
  std::printf("  model      %s, loss %s, %s parameters\n", c.spec.layers_string().c_str(),
              to_string(c.spec.loss).data(), thousands(c.spec.parameter_count()).c_str());
  if (!c.has_training_state) {
    std::printf("  step       %llu, epoch %llu (model only: no training state)\n",
                (unsigned long long)c.state.step, (unsigned long long)c.state.epoch);
    return;
  }
  const Settings& s = c.settings;
  const std::size_t batches = (c.train_rows + s.batch - 1) / s.batch;
  if (c.state.epoch >= s.epochs) {
    std::printf("  position   step %llu: all %s done\n", (unsigned long long)c.state.step,
                count_of(s.epochs, "epoch").c_str());
  } else {
    std::printf("  position   step %llu: epoch %llu of %llu, next batch %llu of %zu\n",
                (unsigned long long)c.state.step, (unsigned long long)c.state.epoch + 1,
                (unsigned long long)s.epochs, (unsigned long long)c.state.batch_in_epoch, batches);
  }
  print_optimizer(s);
  std::printf(", %s of state\n", count_of(c.optimizer_steps, "step").c_str());
  std::printf("  training   batch %llu, seed %llu, max steps %s, on %s x %llu samples\n",
              (unsigned long long)s.batch, (unsigned long long)s.seed,
              s.max_steps < 0 ? "none" : std::to_string(s.max_steps).c_str(),
              thousands(c.train_rows).c_str(), (unsigned long long)c.train_cols);
  if (s.deterministic) {
    std::printf("  mode       deterministic, chunks of %llu rows\n", (unsigned long long)s.chunk);
  } else {
    std::printf("  mode       default (sums follow the ranks)\n");
  }
  if (c.state.best_epoch > 0) {
    std::printf("  best       epoch %llu: %s %.6g; %s since\n",
                (unsigned long long)c.state.best_epoch, s.monitor.c_str(),
                monitored(s.monitor, c.state.best_metric),
                count_of(c.state.epochs_without_improvement, "epoch").c_str());
  }
  std::printf("  written by %s\n", ranks_text(c.world_size, c.threads).c_str());
  std::printf("  settings  ");
  for (const SettingSpec& spec : settings_table()) {
    if (spec.attribute) std::printf(" %s %s", spec.flag, format_setting(spec, s).c_str());
  }
  std::printf("\n");
}

}  // namespace shardprop::app
