// Synthetic Llama checkpoints: config text first, parsed by the same parser the loader uses, then
// the loader's own tensor list.
#include "triplane/gpu/random_model.hpp"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/model_config.hpp"
#include "triplane/gpu/safetensors.hpp"

namespace triplane::gpu {

caf::error write_random_llama(const std::string& dir, const random_llama_spec& spec, const weight_generator& next) {
  std::ostringstream text;
  text << "{\"model_type\": \"llama\", \"vocab_size\": " << spec.vocab_size
       << ", \"hidden_size\": " << spec.hidden_size << ", \"intermediate_size\": " << spec.intermediate_size
       << ", \"num_hidden_layers\": " << spec.num_layers << ", \"num_attention_heads\": " << spec.num_heads
       << ", \"num_key_value_heads\": " << spec.num_kv_heads << ", \"head_dim\": " << spec.head_dim
       << ", \"max_position_embeddings\": " << spec.max_position_embeddings
       << ", \"rms_norm_eps\": 1e-5, \"rope_theta\": 500000.0";
  if (spec.llama3_rope_scaling)
    text << ", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 32.0, \"low_freq_factor\": 1.0,"
            " \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}";
  text << ", \"tie_word_embeddings\": true}";
  auto config = parse_model_config(text.str(), "random Llama spec");
  if (!config) return std::move(config.error());

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return make_error(errc::io_error, "cannot create '" + dir + "': " + ec.message());
  {
    std::ofstream out(dir + "/config.json", std::ios::binary | std::ios::trunc);
    out << text.str();
    if (!out.flush()) return make_error(errc::io_error, "cannot write '" + dir + "/config.json'");
  }
  std::vector<tensor_to_write> tensors;
  for (auto& [name, shape] : checkpoint::required_tensors(*config)) {
    int64_t count = 1;
    for (auto d : shape) count *= d;
    const bool norm = shape.size() == 1;
    tensor_to_write t{name, dtype::bf16, shape, std::vector<unsigned char>(static_cast<size_t>(count) * 2)};
    unsigned char* out = t.data.data();
    for (int64_t i = 0; i < count; ++i) {
      const uint16_t b = f32_to_bf16(next(norm));
      std::memcpy(out + 2 * i, &b, 2);
    }
    tensors.push_back(std::move(t));
  }
  return write_safetensors(dir + "/model.safetensors", tensors);
}

} // namespace triplane::gpu
