#include "shardprop/spec.hpp"

#include <climits>

#include <charconv>

#include "shardprop/error.hpp"

namespace shardprop {

namespace {
constexpr std::string_view kActivationNames[] = {"identity", "sigmoid", "tanh", "relu",
                                                  "softmax"};
constexpr std::string_view kLossNames[] = {"xent", "bce", "mse"};
}  // namespace

std::string_view to_string(Activation a) { return kActivationNames[static_cast<int>(a)]; }
std::string_view to_string(Loss l) { return kLossNames[static_cast<int>(l)]; }

Activation parse_activation(std::string_view name) {
  for (int i = 0; i < 5; ++i) {
    if (kActivationNames[i] == name) return static_cast<Activation>(i);
  }
  SP_THROW("unknown activation '", name, "' (expected identity, sigmoid, tanh, relu or softmax)");
}

Loss parse_loss(std::string_view name) {
  for (int i = 0; i < 3; ++i) {
    if (kLossNames[i] == name) return static_cast<Loss>(i);
  }
  SP_THROW("--loss: unknown loss '", name, "' (expected xent, bce or mse)");
}

std::string ModelSpec::layers_string() const {
  std::string s = std::to_string(input_width());
  for (const auto& layer : layers) {
    s.append(",").append(std::to_string(layer.out)).append(":").append(to_string(layer.activation));
  }
  return s;
}

std::size_t ModelSpec::parameter_count() const {
  std::size_t n = 0;
  for (const auto& layer : layers) n += (layer.in + 1) * layer.out;
  return n;
}

namespace {

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  while (true) {
    const std::size_t pos = s.find(sep, start);
    parts.push_back(s.substr(start, pos - start));
    if (pos == std::string_view::npos) return parts;
    start = pos + 1;
  }
}

std::size_t parse_width(std::string_view text, std::string_view entry) {
  std::size_t width = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), width);
  SP_CHECK(ec == std::errc() && end == text.data() + text.size() && !text.empty(),
           "--layers: '", entry, "' does not start with a width");
  SP_CHECK(width > 0, "--layers: width 0 in '", entry, "'");
  SP_CHECK(width <= (std::size_t{1} << 24), "--layers: width ", width, " in '", entry,
           "' is too large");
  return width;
}

}  // namespace

ModelSpec parse_model(std::string_view layers, std::string_view loss) {
  SP_CHECK(!layers.empty(), "--layers: empty");
  const auto entries = split(layers, ',');
  SP_CHECK(entries.size() >= 2, "--layers: '", layers,
           "' has one entry; give the input width and at least one layer");
  ModelSpec spec;
  spec.loss = parse_loss(loss);
  std::size_t in = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const std::string_view entry = entries[i];
    SP_CHECK(!entry.empty(), "--layers: empty entry at position ", i + 1, " in '", layers, "'");
    const std::size_t colon = entry.find(':');
    const std::size_t width = parse_width(entry.substr(0, colon), entry);
    const bool last = i + 1 == entries.size();
    Activation act = last ? Activation::softmax : Activation::relu;
    if (colon != std::string_view::npos) {
      SP_CHECK(i > 0, "--layers: the input entry '", entry, "' takes no activation");
      const std::string_view name = entry.substr(colon + 1);
      try {
        act = parse_activation(name);
      } catch (const Error& e) {
        SP_THROW("--layers: ", e.message(), " in '", entry, "'");
      }
    }
    if (i > 0) {
      SP_CHECK(act != Activation::softmax || last, "--layers: softmax is only allowed on the "
               "output layer, not in '", entry, "'");
      spec.layers.push_back({in, width, act});
    }
    in = width;
  }
  // Each layer's gradient is reduced in one MPI call, whose count is an int.
  std::size_t total = 0;
  for (std::size_t l = 0; l < spec.layers.size(); ++l) {
    const std::size_t count = (spec.layers[l].in + 1) * spec.layers[l].out;  // < 2^49
    total += count;
    SP_CHECK(count <= std::size_t(INT_MAX), "--layers: layer ", l + 1, " (",
             spec.layers[l].in, "->", spec.layers[l].out, ") has ", count,
             " parameters; at most ", INT_MAX, " per layer are supported");
    SP_CHECK(total <= std::size_t(INT_MAX), "--layers: '", layers, "' has more than ", INT_MAX,
             " parameters");
  }
  const Activation out = spec.output_activation();
  const Activation wanted = spec.loss == Loss::xent  ? Activation::softmax
                            : spec.loss == Loss::bce ? Activation::sigmoid
                                                     : Activation::identity;
  SP_CHECK(out == wanted, "--loss ", to_string(spec.loss), " does not fit the output activation ",
           to_string(out), " (", to_string(spec.loss), " needs :", to_string(wanted), ")");
  SP_CHECK(spec.loss != Loss::xent || spec.output_width() >= 2,
           "--layers: softmax output needs at least 2 classes, got ", spec.output_width());
  return spec;
}

}  // namespace shardprop
