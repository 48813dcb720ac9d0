// The train command's options, made from the settings table.
#include <charconv>

#include "commands.hpp"
#include "shardprop/error.hpp"

namespace shardprop::app {

void add_settings_options(CLI::App& command, Settings& settings, GivenFlags& given) {
  const Settings defaults;
  for (const SettingSpec& spec : settings_table()) {
    const std::string flag = spec.flag;
    std::string help = spec.help;
    const std::string shown = format_setting(spec, defaults);
    const bool is_flag = std::holds_alternative<bool Settings::*>(spec.field);
    if (!is_flag && shown != "none" && flag != "--threads") help += " [default: " + shown + "]";
    if (is_flag) {
      command.add_flag_function(
          flag, [&settings, &given, &spec](std::int64_t) {
            parse_setting(spec, settings, "on");
            given.insert(spec.flag);
          },
          help);
    } else {
      const bool text = std::holds_alternative<std::string Settings::*>(spec.field);
      const bool real = std::holds_alternative<double Settings::*>(spec.field);
      command
          .add_option_function<std::string>(
              flag, [&settings, &given, &spec](const std::string& value) {
                parse_setting(spec, settings, value);
                given.insert(spec.flag);
              },
              help)
          ->type_name(spec.choices ? spec.choices : text ? "TEXT" : real ? "X" : "N");
    }
  }
}

std::optional<std::size_t> parse_label_column(const std::string& text) {
  if (text == "none") return std::nullopt;
  std::size_t column = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), column);
  SP_CHECK_USAGE(ec == std::errc() && end == text.data() + text.size() && !text.empty(),
                 "--label-column: '", text, "' is neither a column number (from 0) nor 'none'");
  return column;
}

}  // namespace shardprop::app
