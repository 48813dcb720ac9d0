// `shardprop eval` and `shardprop predict`: a saved model on a data set.
#include <cstdio>
#include <vector>

#include "commands.hpp"
#include "shardprop/checkpoint.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/train.hpp"

namespace shardprop::app {

namespace {

// The model of a checkpoint, its products set up as the flags say (the training's precision
// unless --precision is given).
Mlp<float> model_of(const Checkpoint& model, const ModelArgs& args, std::size_t chunk) {
  select_gemm(args.gemm);
  const std::string& precision = args.precision.empty() ? model.settings.precision
                                                        : args.precision;
  // A bf16-trained deterministic model cannot exist, so a deterministic one is float32.
  return Mlp<float>(model.spec, chunk, parse_precision(precision));
}

}  // namespace

int run_eval(const ModelArgs& args, MpiComm& comm) {
  const Checkpoint model = load_shared(comm, args.checkpoint, "--checkpoint");
  // A model trained with --deterministic is evaluated in its chunks and sums: the same bits
  // on any number of ranks.
  const std::size_t chunk = model.settings.deterministic_chunk();
  Dataset data;
  collective_check(comm, [&] {
    // Each rank reads only the rows it evaluates.
    data = comm.size() > 1 ? read_dataset(args.data, true, RowBlock{comm.rank(), comm.size(), chunk})
                           : read_dataset(args.data);
    check_fits(data, model.spec, args.data);
  });
  Mlp<float> mlp = model_of(model, args, chunk);
  const auto reducer = make_reducer<float>(mlp.layout(), comm, chunk);
  const EvalStats e = evaluate_dataset(mlp, *reducer, comm, model.params, data, args.eval_batch);
  if (comm.rank() == 0) {
    std::printf("{\"loss\":%.9g,\"accuracy\":%.9g,\"samples\":%zu}\n", e.loss, e.accuracy,
                e.samples);
  }
  return 0;
}

// Predicted classes and outputs for every sample; rank 0 does the work.
int run_predict(const ModelArgs& args, MpiComm& comm) {
  collective_check(comm, [&] {
    if (comm.rank() != 0) return;
    check_predictions_path("--out", args.out);
    const CheckpointSource source = find_checkpoint(args.checkpoint, "--checkpoint");
    const Checkpoint model = parse_checkpoint(source.bytes, source.path);
    const Dataset data = args.data.ends_with(".csv") ? read_csv(args.data, args.label_column)
                                                      : read_dataset(args.data, false);
    check_fits(data, model.spec, args.data);
    const std::size_t k = model.spec.output_width();
    // A model trained with --deterministic predicts in its chunks: the same bits on any
    // number of threads.
    const std::size_t chunk = model.settings.deterministic_chunk();
    Mlp<float> mlp = model_of(model, args, chunk);
    const std::size_t pass = pass_rows(args.eval_batch, data.rows, chunk);
    mlp.reserve(pass);
    std::vector<std::int32_t> predictions(data.rows);
    AlignedVector<float> outputs(data.rows * k), x(pass * data.cols);
    const RowCopier copy_row(data);
    for (std::size_t begin = 0; begin < data.rows; begin += pass) {
      const auto rows = Eigen::Index(std::min(pass, data.rows - begin));
      for (Eigen::Index r = 0; r < rows; ++r) {
        copy_row(begin + std::size_t(r), x.data() + std::size_t(r) * data.cols);
      }
      const auto y = mlp.predict(model.params,
                                 ConstMatrixView<float>(x.data(), rows, Eigen::Index(data.cols)));
      for (Eigen::Index r = 0; r < rows; ++r) {
        const std::size_t i = begin + std::size_t(r);
        predictions[i] = predicted_class<float>(ConstRowVectorView<float>(y.row(r).data(), y.cols()));
        std::copy_n(y.data() + r * y.cols(), k, outputs.data() + i * k);
      }
    }
    write_predictions(args.out, predictions, outputs, k);
    std::printf("%s: %zu predictions from %s (step %llu)\n", args.out.c_str(), data.rows,
                source.path.c_str(), (unsigned long long)model.state.step);
  });
  return 0;
}

}  // namespace shardprop::app
