// config.json parsing and validation, and the RoPE frequency tables transformers derives from it.
#include "triplane/gpu/model_config.hpp"

#include <cmath>
#include <fstream>
#include <sstream>

#include "json.hpp"

namespace triplane::gpu {

namespace {

// Reads fields from a JSON object, accumulating the first error with the origin and field name.
class field_reader {
public:
  field_reader(const json::value& root, std::string origin) : root_(root), origin_(std::move(origin)) {}

  const caf::error& error() const { return error_; }

  void fail(const std::string& field, const std::string& what) {
    if (!error_)
      error_ = make_error(errc::invalid_argument, origin_ + ": field '" + field + "' " + what);
  }

  const json::value* get(const json::value& obj, const std::string& field) {
    const auto* v = obj.find(field);
    if (v != nullptr && v->is_null()) return nullptr;
    return v;
  }

  // Integer field in [min, max]; `fallback` when absent (or null) unless required.
  int64_t integer(const json::value& obj, const std::string& field, bool required, int64_t fallback,
                  int64_t min = 1, int64_t max = int64_t{1} << 40) {
    const auto* v = get(obj, field);
    if (v == nullptr) {
      if (required) fail(field, "is missing");
      return fallback;
    }
    if (v->type != json::kind::number || !v->is_integer) {
      fail(field, std::string("must be an integer, got ") +
                      (v->type == json::kind::number ? "a non-integer number" : json::kind_name(v->type)));
      return fallback;
    }
    if (v->integer < min || v->integer > max) {
      fail(field, "is " + std::to_string(v->integer) + ", outside [" + std::to_string(min) + ", " +
                      std::to_string(max) + "]");
      return fallback;
    }
    return v->integer;
  }

  double number(const json::value& obj, const std::string& field, bool required, double fallback,
                bool positive = true) {
    const auto* v = get(obj, field);
    if (v == nullptr) {
      if (required) fail(field, "is missing");
      return fallback;
    }
    if (v->type != json::kind::number) {
      fail(field, std::string("must be a number, got ") + json::kind_name(v->type));
      return fallback;
    }
    if (!std::isfinite(v->number) || (positive && !(v->number > 0))) {
      fail(field, "must be a finite positive number");
      return fallback;
    }
    return v->number;
  }

  bool boolean(const json::value& obj, const std::string& field, bool fallback) {
    const auto* v = get(obj, field);
    if (v == nullptr) return fallback;
    if (v->type != json::kind::boolean) {
      fail(field, std::string("must be a boolean, got ") + json::kind_name(v->type));
      return fallback;
    }
    return v->boolean;
  }

  std::string string(const json::value& obj, const std::string& field) {
    const auto* v = get(obj, field);
    if (v == nullptr) return {};
    if (v->type != json::kind::string) {
      fail(field, std::string("must be a string, got ") + json::kind_name(v->type));
      return {};
    }
    return v->string;
  }

  const json::value& root() const { return root_; }

private:
  const json::value& root_;
  std::string origin_;
  caf::error error_;
};

void parse_rope(field_reader& in, const json::value& root, model_config& cfg) {
  // transformers 5: everything under rope_parameters. Older: rope_theta + rope_scaling at the top.
  const json::value* params = in.get(root, "rope_parameters");
  const json::value* scaling = nullptr;
  std::string prefix;
  if (params != nullptr) {
    if (params->type != json::kind::object) {
      in.fail("rope_parameters", "must be an object");
      return;
    }
    scaling = params;
    prefix = "rope_parameters.";
    cfg.rope.theta = in.number(*params, "rope_theta", false, 10000.0);
    if (params->find("rope_theta") == nullptr)  // some writers keep theta at the top level
      cfg.rope.theta = in.number(root, "rope_theta", false, 10000.0);
  } else {
    cfg.rope.theta = in.number(root, "rope_theta", false, 10000.0);
    scaling = in.get(root, "rope_scaling");
    prefix = "rope_scaling.";
    if (scaling != nullptr && scaling->type != json::kind::object) {
      in.fail("rope_scaling", "must be an object or null");
      return;
    }
  }
  if (scaling == nullptr) return;
  std::string type = in.string(*scaling, "rope_type");
  if (type.empty()) type = in.string(*scaling, "type");  // pre-4.45 spelling
  if (type.empty() || type == "default") {
    cfg.rope.kind = rope_kind::standard;
  } else if (type == "linear") {
    cfg.rope.kind = rope_kind::linear;
    cfg.rope.factor = in.number(*scaling, "factor", true, 1.0);
  } else if (type == "llama3") {
    cfg.rope.kind = rope_kind::llama3;
    cfg.rope.factor = in.number(*scaling, "factor", true, 1.0);
    cfg.rope.low_freq_factor = in.number(*scaling, "low_freq_factor", true, 1.0);
    cfg.rope.high_freq_factor = in.number(*scaling, "high_freq_factor", true, 4.0);
    cfg.rope.original_max_position_embeddings =
        in.integer(*scaling, "original_max_position_embeddings", true, 8192);
    if (!in.error() && !(cfg.rope.high_freq_factor > cfg.rope.low_freq_factor))
      in.fail(prefix + "high_freq_factor", "must be greater than low_freq_factor");
  } else {
    in.fail(prefix + "rope_type", "is '" + type + "': only default, linear and llama3 are supported");
  }
}

} // namespace

expected<model_config> parse_model_config(std::string_view json_text, const std::string& origin) {
  json::value root;
  std::string parse_error;
  if (!json::parse(json_text, root, parse_error))
    return make_error(errc::invalid_argument, origin + ": not valid JSON: " + parse_error);
  if (root.type != json::kind::object)
    return make_error(errc::invalid_argument, origin + ": top level must be a JSON object");

  field_reader in(root, origin);
  model_config cfg;
  std::string model_type = in.string(root, "model_type");
  if (!model_type.empty() && model_type != "llama")
    in.fail("model_type", "is '" + model_type + "': only 'llama' is supported");
  std::string act = in.string(root, "hidden_act");
  if (!act.empty() && act != "silu") in.fail("hidden_act", "is '" + act + "': only 'silu' is supported");
  if (in.boolean(root, "attention_bias", false)) in.fail("attention_bias", "is true: biases are not supported");
  if (in.boolean(root, "mlp_bias", false)) in.fail("mlp_bias", "is true: biases are not supported");

  cfg.vocab_size = in.integer(root, "vocab_size", true, 0, 1, int64_t{1} << 24);
  cfg.hidden_size = in.integer(root, "hidden_size", true, 0, 1, int64_t{1} << 20);
  cfg.intermediate_size = in.integer(root, "intermediate_size", true, 0, 1, int64_t{1} << 22);
  cfg.num_layers = in.integer(root, "num_hidden_layers", true, 0, 1, 4096);
  cfg.num_heads = in.integer(root, "num_attention_heads", true, 0, 1, 4096);
  cfg.num_kv_heads = in.integer(root, "num_key_value_heads", false, cfg.num_heads, 1, 4096);
  cfg.max_position_embeddings = in.integer(root, "max_position_embeddings", false, 2048, 1, int64_t{1} << 30);
  cfg.rms_norm_eps = in.number(root, "rms_norm_eps", false, 1e-6);
  cfg.tie_word_embeddings = in.boolean(root, "tie_word_embeddings", false);
  if (in.error()) return in.error();
  if (in.get(root, "head_dim") != nullptr) {
    cfg.head_dim = in.integer(root, "head_dim", true, 0, 2, 4096);
  } else {
    if (cfg.hidden_size % cfg.num_heads != 0)
      in.fail("hidden_size", "(" + std::to_string(cfg.hidden_size) + ") is not divisible by num_attention_heads (" +
                                 std::to_string(cfg.num_heads) + ") and head_dim is not given");
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
  }
  if (!in.error() && cfg.num_heads % cfg.num_kv_heads != 0)
    in.fail("num_attention_heads", "(" + std::to_string(cfg.num_heads) +
                                       ") is not divisible by num_key_value_heads (" +
                                       std::to_string(cfg.num_kv_heads) + ")");
  if (!in.error() && cfg.head_dim % 2 != 0)
    in.fail("head_dim", "is " + std::to_string(cfg.head_dim) + ": RoPE needs an even head dimension");
  if (const auto* eos = in.get(root, "eos_token_id")) {
    if (eos->type == json::kind::number && eos->is_integer && eos->integer >= 0) {
      cfg.eos_token_ids.push_back(eos->integer);
    } else if (eos->type == json::kind::array) {
      for (const auto& e : eos->array) {
        if (e.type != json::kind::number || !e.is_integer || e.integer < 0) {
          in.fail("eos_token_id", "must hold non-negative integers");
          break;
        }
        cfg.eos_token_ids.push_back(e.integer);
      }
    } else {
      in.fail("eos_token_id", "must be a non-negative integer or a list of them");
    }
  }
  if (!in.error()) parse_rope(in, root, cfg);
  if (in.error()) return in.error();
  return cfg;
}

expected<model_config> load_model_config(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return make_error(errc::not_found, path + ": cannot open model config");
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) return make_error(errc::io_error, path + ": read failed");
  return parse_model_config(text.str(), path);
}

std::vector<float> rope_inv_freq(const model_config& config) {
  // transformers: inv_freq = 1 / (base ** (arange(0, dim, 2).float() / dim)), all in float32.
  const int64_t dim = config.head_dim;
  std::vector<float> inv(static_cast<size_t>(dim / 2));
  for (int64_t i = 0; i < dim / 2; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    float p = static_cast<float>(std::pow(config.rope.theta, static_cast<double>(exponent)));
    inv[static_cast<size_t>(i)] = 1.0f / p;
  }
  const auto& r = config.rope;
  if (r.kind == rope_kind::linear) {
    for (auto& f : inv) f = f / static_cast<float>(r.factor);
  } else if (r.kind == rope_kind::llama3) {
    // _compute_llama3_parameters: keep high frequencies, divide low ones by `factor`,
    // interpolate in between. Python scalars are doubles; tensor math is float32.
    const double old_len = static_cast<double>(r.original_max_position_embeddings);
    const double low_freq_wavelen = old_len / r.low_freq_factor;
    const double high_freq_wavelen = old_len / r.high_freq_factor;
    const float factor = static_cast<float>(r.factor);
    for (auto& f : inv) {
      float wavelen = static_cast<float>(2.0 * M_PI) / f;
      float scaled = wavelen > static_cast<float>(low_freq_wavelen) ? f / factor : f;
      bool medium = !(wavelen < static_cast<float>(high_freq_wavelen)) &&
                    !(wavelen > static_cast<float>(low_freq_wavelen));
      if (medium) {
        float smooth = (static_cast<float>(old_len) / wavelen - static_cast<float>(r.low_freq_factor)) /
                       static_cast<float>(r.high_freq_factor - r.low_freq_factor);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
  return inv;
}

} // namespace triplane::gpu
