// A Hugging Face Llama model directory opened for loading: config.json plus model.safetensors or
// the shards named by model.safetensors.index.json, mapped and checked against the config.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "triplane/gpu/model_config.hpp"
#include "triplane/gpu/safetensors.hpp"

namespace triplane::gpu {

/// Hugging Face tensor names of the Llama architecture.
namespace tensor_names {
std::string embed_tokens();               ///< model.embed_tokens.weight   [vocab, hidden]
std::string final_norm();                 ///< model.norm.weight            [hidden]
std::string lm_head();                    ///< lm_head.weight               [vocab, hidden]
std::string layer(int64_t layer, const char* suffix);  ///< model.layers.N.<suffix>
} // namespace tensor_names

/// A tensor and the file it lives in (for error messages).
struct located_tensor {
  const tensor_view* view = nullptr;
  const std::string* file = nullptr;
};

/// Every tensor the config requires is present, float-typed (F32/F16/BF16) and of the shape the
/// config implies; otherwise open() fails with an error naming the file and the tensor. Extra
/// tensors are ignored. The mapped files stay open (and views valid) while the checkpoint lives.
/// A tensor a checkpoint must hold: its name (see tensor_names) and shape.
struct tensor_requirement {
  std::string name;
  std::vector<int64_t> shape;
};

class checkpoint {
public:
  /// The tensors a checkpoint of `config` must hold, in a fixed order: the embedding, each
  /// layer's nine, the final norm, and lm_head unless the embeddings are tied. open() requires
  /// exactly these names and shapes; writers of synthetic models use the same list.
  static std::vector<tensor_requirement> required_tensors(const model_config& config);

  /// Opens `model_dir`. `config_name` selects the config file inside it (tests use
  /// "config.legacy.json"). Errors: not_found (missing files), corrupted (bad safetensors),
  /// invalid_argument (bad config, missing/mis-shaped/mis-typed tensors).
  static expected<std::unique_ptr<checkpoint>> open(const std::string& model_dir,
                                                    const std::string& config_name = "config.json");

  const model_config& config() const { return config_; }
  const std::string& directory() const { return dir_; }

  /// A required tensor (see tensor_names); for tied embeddings lm_head() resolves to the embedding.
  /// Precondition: `name` is one of the required names (asserted).
  located_tensor get(const std::string& name) const;

  /// The dtype shared by the weights when they all have one; f32 otherwise.
  dtype weight_dtype() const { return weight_dtype_; }

  /// Total bytes of the required tensors as stored.
  size_t weight_bytes() const { return weight_bytes_; }

private:
  checkpoint() = default;
  std::string dir_;
  model_config config_;
  std::vector<std::unique_ptr<safetensors_file>> files_;
  std::unordered_map<std::string, located_tensor> tensors_;
  dtype weight_dtype_ = dtype::f32;
  size_t weight_bytes_ = 0;
};

} // namespace triplane::gpu
