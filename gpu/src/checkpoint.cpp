// Opening a model directory: config, single or sharded safetensors, and the shape/dtype checks
// that make every later read in-bounds.
#include "triplane/gpu/checkpoint.hpp"

#include <sys/stat.h>

#include <cassert>
#include <fstream>
#include <map>
#include <sstream>

#include "json.hpp"

namespace triplane::gpu {

namespace tensor_names {
std::string embed_tokens() { return "model.embed_tokens.weight"; }
std::string final_norm() { return "model.norm.weight"; }
std::string lm_head() { return "lm_head.weight"; }
std::string layer(int64_t layer, const char* suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}
} // namespace tensor_names

namespace {

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

expected<std::string> read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return make_error(errc::not_found, path + ": cannot open");
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

// Parses model.safetensors.index.json: tensor name -> shard file name (validated: a plain file
// name inside the model directory, never a path).
expected<std::map<std::string, std::string>> read_index(const std::string& path) {
  auto text = read_text(path);
  if (!text) return text.error();
  json::value root;
  std::string err;
  if (!json::parse(*text, root, err)) return make_error(errc::corrupted, path + ": not valid JSON: " + err);
  const auto* map = root.find("weight_map");
  if (map == nullptr || map->type != json::kind::object)
    return make_error(errc::corrupted, path + ": missing object 'weight_map'");
  std::map<std::string, std::string> out;
  for (const auto& [name, file] : map->object) {
    if (file.type != json::kind::string)
      return make_error(errc::corrupted, path + ": weight_map entry for tensor '" + name + "' is not a string");
    const std::string& f = file.string;
    if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos || f.find('\0') != std::string::npos)
      return make_error(errc::corrupted,
                        path + ": weight_map entry for tensor '" + name + "' names '" + f + "', not a file name");
    out.emplace(name, f);
  }
  return out;
}

} // namespace

expected<std::unique_ptr<checkpoint>> checkpoint::open(const std::string& model_dir, const std::string& config_name) {
  std::unique_ptr<checkpoint> ckpt(new checkpoint());
  ckpt->dir_ = model_dir;
  auto cfg = load_model_config(model_dir + "/" + config_name);
  if (!cfg) return cfg.error();
  ckpt->config_ = *cfg;

  // Which file holds which tensor.
  std::map<std::string, std::string> tensor_file;  // empty: single-file model
  const std::string index_path = model_dir + "/model.safetensors.index.json";
  const std::string single_path = model_dir + "/model.safetensors";
  std::map<std::string, safetensors_file*> opened;
  if (file_exists(index_path)) {
    auto index = read_index(index_path);
    if (!index) return index.error();
    tensor_file = std::move(*index);
    for (const auto& entry : tensor_file) {
      if (opened.count(entry.second)) continue;
      auto f = safetensors_file::open(model_dir + "/" + entry.second);
      if (!f) return f.error();
      opened[entry.second] = f->get();
      ckpt->files_.push_back(std::move(*f));
    }
  } else if (file_exists(single_path)) {
    auto f = safetensors_file::open(single_path);
    if (!f) return f.error();
    opened["model.safetensors"] = f->get();
    ckpt->files_.push_back(std::move(*f));
  } else {
    return make_error(errc::not_found, model_dir + ": neither model.safetensors nor model.safetensors.index.json exists");
  }

  bool first = true;
  bool mixed = false;
  for (const auto& [name, shape] : required_tensors(ckpt->config_)) {
    safetensors_file* file = nullptr;
    if (tensor_file.empty()) {
      file = ckpt->files_.front().get();
    } else {
      auto it = tensor_file.find(name);
      if (it == tensor_file.end())
        return make_error(errc::invalid_argument, index_path + ": tensor '" + name + "' is missing from weight_map");
      file = opened.at(it->second);
    }
    const tensor_view* view = file->find(name);
    if (view == nullptr)
      return make_error(errc::invalid_argument, file->path() + ": tensor '" + name + "' is missing");
    if (view->type != dtype::f32 && view->type != dtype::f16 && view->type != dtype::bf16)
      return make_error(errc::invalid_argument, file->path() + ": tensor '" + name + "' has dtype " +
                                                    dtype_name(view->type) + ", expected F32, F16 or BF16");
    if (view->shape != shape)
      return make_error(errc::invalid_argument, file->path() + ": tensor '" + name + "' has shape " +
                                                    shape_string(view->shape) + ", the config implies " +
                                                    shape_string(shape));
    if (first) ckpt->weight_dtype_ = view->type;
    else if (view->type != ckpt->weight_dtype_) mixed = true;
    first = false;
    ckpt->weight_bytes_ += view->nbytes;
    ckpt->tensors_[name] = located_tensor{view, &file->path()};
  }
  if (mixed) ckpt->weight_dtype_ = dtype::f32;
  return ckpt;
}

std::vector<tensor_requirement> checkpoint::required_tensors(const model_config& c) {
  std::vector<tensor_requirement> out;
  out.push_back({tensor_names::embed_tokens(), {c.vocab_size, c.hidden_size}});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    using tensor_names::layer;
    out.push_back({layer(l, "input_layernorm.weight"), {c.hidden_size}});
    out.push_back({layer(l, "self_attn.q_proj.weight"), {c.q_size(), c.hidden_size}});
    out.push_back({layer(l, "self_attn.k_proj.weight"), {c.kv_size(), c.hidden_size}});
    out.push_back({layer(l, "self_attn.v_proj.weight"), {c.kv_size(), c.hidden_size}});
    out.push_back({layer(l, "self_attn.o_proj.weight"), {c.hidden_size, c.q_size()}});
    out.push_back({layer(l, "post_attention_layernorm.weight"), {c.hidden_size}});
    out.push_back({layer(l, "mlp.gate_proj.weight"), {c.intermediate_size, c.hidden_size}});
    out.push_back({layer(l, "mlp.up_proj.weight"), {c.intermediate_size, c.hidden_size}});
    out.push_back({layer(l, "mlp.down_proj.weight"), {c.hidden_size, c.intermediate_size}});
  }
  out.push_back({tensor_names::final_norm(), {c.hidden_size}});
  if (!c.tie_word_embeddings) out.push_back({tensor_names::lm_head(), {c.vocab_size, c.hidden_size}});
  return out;
}

located_tensor checkpoint::get(const std::string& name) const {
  if (config_.tie_word_embeddings && name == tensor_names::lm_head())
    return tensors_.at(tensor_names::embed_tokens());
  auto it = tensors_.find(name);
  assert(it != tensors_.end() && "checkpoint::get: not a required tensor name");
  return it->second;
}

} // namespace triplane::gpu
