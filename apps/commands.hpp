// The commands of the shardprop program, each in its own file, and what they share.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "shardprop/comm.hpp"
#include "shardprop/settings.hpp"

namespace shardprop::app {

// train: train_command.cpp. `given` holds the flags named on the command line.
int run_train(const Settings& cli, const GivenFlags& given, MpiComm& comm);

struct ModelArgs {
  std::string checkpoint, data, out;
  std::size_t eval_batch = 1024;
  std::optional<std::size_t> label_column;  // predict --data F.csv: the labels' column
  std::string precision;                    // "": the model's own
  std::string gemm = "auto";
};
// eval, predict: model_commands.cpp.
int run_eval(const ModelArgs& args, MpiComm& comm);
int run_predict(const ModelArgs& args, MpiComm& comm);

struct ConvertArgs {
  std::string images, labels, csv, out;
  std::optional<std::size_t> label_column = 0;
};
// convert, info: data_commands.cpp.
int run_convert(const ConvertArgs& args, MpiComm& comm);
int run_info(const std::string& path, MpiComm& comm);

// One option per row of the settings table, writing into `settings` and recording each
// flag given in `given`; a bad value throws UsageError.
void add_settings_options(CLI::App& command, Settings& settings, GivenFlags& given);

// A CSV label column: a 0-based number, or "none".
std::optional<std::size_t> parse_label_column(const std::string& text);

}  // namespace shardprop::app
