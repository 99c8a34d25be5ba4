// The architecture of a Llama-family model, read from a Hugging Face config.json (both the
// top-level `rope_theta`/`rope_scaling` form and the transformers-5 `rope_parameters` form).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

/// RoPE variants we implement. Others (dynamic, yarn, longrope, ...) are rejected at load.
enum class rope_kind { standard, linear, llama3 };

struct rope_config {
  rope_kind kind = rope_kind::standard;
  double theta = 10000.0;
  double factor = 1.0;                            ///< linear and llama3
  double low_freq_factor = 1.0;                   ///< llama3
  double high_freq_factor = 4.0;                  ///< llama3
  int64_t original_max_position_embeddings = 0;  ///< llama3
};

/// Validated: every size positive, hidden/heads/kv-heads divisibility holds, head_dim even.
struct model_config {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;   ///< defaults to num_heads
  int64_t head_dim = 0;       ///< defaults to hidden_size / num_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  rope_config rope;
  std::vector<int64_t> eos_token_ids;  ///< from `eos_token_id` (int or list); may be empty

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
};

/// Parses and validates config.json text. `origin` (usually the file path) prefixes every error.
/// Errors: errc::invalid_argument naming the field and what is wrong with it.
expected<model_config> parse_model_config(std::string_view json_text, const std::string& origin);

/// Reads and parses the file at `path`. Errors: errc::not_found / io_error, or as above.
expected<model_config> load_model_config(const std::string& path);

/// RoPE inverse frequencies (head_dim / 2 floats), computed in float32 exactly as transformers'
/// `ROPE_INIT_FUNCTIONS` do for the config's rope type (default, linear, llama3).
std::vector<float> rope_inv_freq(const model_config& config);

} // namespace triplane::gpu
