// A small strict JSON reader (RFC 8259) for config.json and safetensors headers: no JSON library is
// among the project's dependencies, and both inputs are small. Private to the gpu layer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace triplane::gpu::json {

enum class kind { null, boolean, number, string, array, object };

/// One parsed JSON value. Numbers keep their double value and, when the literal was an integer
/// that fits, its exact int64 value (`is_integer`), so sizes and offsets never go through double.
struct value {
  kind type = kind::null;
  bool boolean = false;
  double number = 0;
  bool is_integer = false;
  int64_t integer = 0;
  std::string string;
  std::vector<value> array;
  std::vector<std::pair<std::string, value>> object;  ///< in document order; keys are unique

  /// The member named `key` of an object, or nullptr (also when this is not an object).
  const value* find(std::string_view key) const;
  bool is_null() const { return type == kind::null; }
};

/// Parses `text` as exactly one JSON value (surrounding whitespace allowed). On failure returns
/// false and sets `error` to a message with the byte offset. Duplicate object keys, trailing
/// commas, comments, NaN/Infinity, invalid UTF-16 escapes and nesting deeper than 64 are errors.
bool parse(std::string_view text, value& out, std::string& error);

/// "object", "string", ...: for error messages.
const char* kind_name(kind k);

} // namespace triplane::gpu::json
