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
  SP_USAGE("unknown activation '", name, "' (expected identity, sigmoid, tanh, relu or softmax)");
}

Loss parse_loss(std::string_view name) {
  for (int i = 0; i < 3; ++i) {
    if (kLossNames[i] == name) return static_cast<Loss>(i);
  }
  SP_USAGE("--loss: unknown loss '", name, "' (expected xent, bce or mse)");
}

std::string layers_string(const std::vector<LayerSpec>& layers) {
  std::string s = std::to_string(layers.front().in);
  for (const auto& layer : layers) {
    s.append(",").append(std::to_string(layer.out)).append(":").append(to_string(layer.activation));
    if (layer.dropout > 0) {
      char rate[32];
      const auto [end, ec] = std::to_chars(rate, rate + sizeof rate, layer.dropout);
      s.append(":dropout=").append(rate, ec == std::errc() ? end : rate);
    }
  }
  return s;
}

bool ModelSpec::has_dropout() const {
  for (const auto& layer : layers) {
    if (layer.dropout > 0) return true;
  }
  return false;
}

std::string ModelSpec::layers_string() const { return shardprop::layers_string(layers); }

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
  SP_CHECK_USAGE(ec == std::errc() && end == text.data() + text.size() && !text.empty(),
                 "--layers: '", entry, "' does not start with a width");
  SP_CHECK_USAGE(width > 0, "--layers: width 0 in '", entry, "'");
  SP_CHECK_USAGE(width <= (std::size_t{1} << 24), "--layers: width ", width, " in '", entry,
                 "' is too large");
  return width;
}

}  // namespace

std::vector<LayerSpec> parse_layers(std::string_view layers) {
  SP_CHECK_USAGE(!layers.empty(), "--layers: empty");
  const auto entries = split(layers, ',');
  SP_CHECK_USAGE(entries.size() >= 2, "--layers: '", layers,
                 "' has one entry; give the input width and at least one layer");
  std::vector<LayerSpec> specs;
  std::size_t in = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const std::string_view entry = entries[i];
    SP_CHECK_USAGE(!entry.empty(), "--layers: empty entry at position ", i + 1, " in '", layers,
                   "'");
    const auto fields = split(entry, ':');
    const std::size_t width = parse_width(fields[0], entry);
    const bool last = i + 1 == entries.size();
    Activation act = last ? Activation::softmax : Activation::relu;
    double dropout = 0;
    bool named = false;
    SP_CHECK_USAGE(i > 0 || fields.size() == 1, "--layers: the input entry '", entry,
                   "' takes no activation or dropout");
    for (std::size_t f = 1; f < fields.size(); ++f) {
      const std::string_view field = fields[f];
      if (field.starts_with("dropout=")) {
        const std::string_view rate = field.substr(8);
        const auto [end, ec] = std::from_chars(rate.data(), rate.data() + rate.size(), dropout);
        SP_CHECK_USAGE(ec == std::errc() && end == rate.data() + rate.size() && !rate.empty(),
                       "--layers: '", field, "' in '", entry, "' is not a number");
        SP_CHECK_USAGE(dropout >= 0 && dropout < 1, "--layers: dropout ", rate, " in '", entry,
                       "' must be >= 0 and < 1");
        SP_CHECK_USAGE(!last || dropout == 0, "--layers: the output layer '", entry,
                       "' cannot drop units");
        continue;
      }
      SP_CHECK_USAGE(!named, "--layers: '", entry, "' names two activations");
      named = true;
      try {
        act = parse_activation(field);
      } catch (const Error& e) {
        SP_USAGE("--layers: ", e.message(), " in '", entry, "'");
      }
    }
    if (i > 0) {
      SP_CHECK_USAGE(act != Activation::softmax || last, "--layers: softmax is only allowed on "
                     "the output layer, not in '", entry, "'");
      specs.push_back({in, width, act, dropout});
    }
    in = width;
  }
  // Each layer's gradient is reduced in one MPI call, whose count is an int.
  std::size_t total = 0;
  for (std::size_t l = 0; l < specs.size(); ++l) {
    const std::size_t count = (specs[l].in + 1) * specs[l].out;  // < 2^49
    total += count;
    SP_CHECK_USAGE(count <= std::size_t(INT_MAX), "--layers: layer ", l + 1, " (", specs[l].in,
                   "->", specs[l].out, ") has ", count, " parameters; at most ", INT_MAX,
                   " per layer are supported");
    SP_CHECK_USAGE(total <= std::size_t(INT_MAX), "--layers: '", layers, "' has more than ",
                   INT_MAX, " parameters");
  }
  return specs;
}

ModelSpec parse_model(std::string_view layers, std::string_view loss) {
  ModelSpec spec;
  spec.loss = parse_loss(loss);
  spec.layers = parse_layers(layers);
  const Activation out = spec.output_activation();
  const Activation wanted = spec.loss == Loss::xent  ? Activation::softmax
                            : spec.loss == Loss::bce ? Activation::sigmoid
                                                     : Activation::identity;
  SP_CHECK_USAGE(out == wanted, "--loss ", to_string(spec.loss),
                 " does not fit the output activation ", to_string(out), " (",
                 to_string(spec.loss), " needs :", to_string(wanted), ")");
  SP_CHECK_USAGE(spec.loss != Loss::xent || spec.output_width() >= 2,
                 "--layers: softmax output needs at least 2 classes, got ", spec.output_width());
  return spec;
}

}  // namespace shardprop
