// The CPU reference backend: float32 Llama forward over a paged KV cache, with tensor-parallel
// ranks run as threads over the in-process collective. Written to be read next to transformers'
// modeling_llama.py: each step below names the module it mirrors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <thread>

#include "cpu_kernels.hpp"
#include "thread_pool.hpp"
#include "triplane/gpu/backend.hpp"
#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/collective.hpp"

namespace triplane::gpu {

namespace {

// Rows [row_begin, row_begin + rows) x columns [col_begin, col_begin + cols) of a 2-D tensor,
// converted to float32 and appended to `out`.
void append_block(const tensor_view& t, int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                  std::vector<float>& out) {
  const int64_t width = t.shape.size() == 2 ? t.shape[1] : t.numel();
  size_t base = out.size();
  out.resize(base + static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    convert_to_f32(t, (row_begin + r) * width + col_begin, cols, out.data() + base + static_cast<size_t>(r * cols));
}

std::vector<float> whole(const tensor_view& t) {
  std::vector<float> out;
  append_block(t, 0, 1, 0, t.numel(), out);
  return out;
}

struct layer_shard {
  std::vector<float> input_norm;  // [hidden]
  std::vector<float> post_norm;   // [hidden]
  std::vector<float> qkv;         // [(q_heads + 2 kv_heads) * head_dim, hidden]: q rows, k rows, v rows
  std::vector<float> o;           // [hidden, q_heads * head_dim]
  std::vector<float> gate_up;     // [2 * mlp, hidden]: gate rows then up rows
  std::vector<float> down;        // [hidden, mlp]
};

// One tensor-parallel rank: its weights, its share of the KV cache, its threads, its collective.
struct rank_state {
  tp_shard shard;
  std::vector<layer_shard> layers;
  std::vector<float> lm_head;        // [shard.vocab_size, hidden]; empty: tied (use embed_) or unused
  std::vector<std::unique_ptr<float[]>> k_cache, v_cache;  // per layer: [slots, kv_heads, head_dim]
  std::unique_ptr<thread_pool> pool;
  std::unique_ptr<collective> comm;
  // Scratch, resized per step.
  std::vector<float> x, h, qkv, attn, proj, gate_up, act, logits_local;
};

class cpu_backend final : public backend {
public:
  cpu_backend(model_config config, const backend_options& options)
      : config_(std::move(config)), tp_(options.tensor_parallel), inv_freq_(rope_inv_freq(config_)),
        blocks_(1, 1) {}

  caf::error init(const checkpoint& weights, const backend_options& options) {
    const auto& c = config_;
    const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int threads = options.threads > 0 ? options.threads : hw;
    const int per_rank = std::max(1, threads / tp_);
    rank_pool_ = std::make_unique<thread_pool>(tp_);
    auto comms = make_cpu_collective_group(tp_);

    embed_ = whole(*weights.get(tensor_names::embed_tokens()).view);
    final_norm_ = whole(*weights.get(tensor_names::final_norm()).view);
    const tensor_view& head = *weights.get(tensor_names::lm_head()).view;

    geometry_.num_layers = c.num_layers;
    geometry_.head_dim = c.head_dim;
    geometry_.block_size = options.kv_block_size;
    int64_t max_kv_heads = 0;
    for (int r = 0; r < tp_; ++r)
      max_kv_heads = std::max(max_kv_heads, shard_for_rank(c, tp_, r).kv_heads);
    geometry_.num_kv_heads = max_kv_heads;
    const int64_t per_block = geometry_.bytes_per_block(sizeof(float));
    const int64_t num_blocks = options.kv_cache_bytes / per_block;
    if (num_blocks < 1)
      return make_error(errc::invalid_argument, "kv_cache_bytes " + std::to_string(options.kv_cache_bytes) +
                                                    " is below one block (" + std::to_string(per_block) + " bytes)");
    if (num_blocks > (int64_t{1} << 30))
      return make_error(errc::invalid_argument, "kv_cache_bytes is too large");
    blocks_ = kv_block_manager(num_blocks, options.kv_block_size);
    const int64_t slots = num_blocks * options.kv_block_size;

    for (int r = 0; r < tp_; ++r) {
      auto rank = std::make_unique<rank_state>();
      rank->shard = shard_for_rank(c, tp_, r);
      const auto& s = rank->shard;
      const int64_t hd = c.head_dim, hidden = c.hidden_size;
      for (int64_t l = 0; l < c.num_layers; ++l) {
        auto get = [&](const char* suffix) -> const tensor_view& {
          return *weights.get(tensor_names::layer(l, suffix)).view;
        };
        layer_shard L;
        L.input_norm = whole(get("input_layernorm.weight"));
        L.post_norm = whole(get("post_attention_layernorm.weight"));
        append_block(get("self_attn.q_proj.weight"), s.q_head_begin * hd, s.q_heads * hd, 0, hidden, L.qkv);
        append_block(get("self_attn.k_proj.weight"), s.kv_head_begin * hd, s.kv_heads * hd, 0, hidden, L.qkv);
        append_block(get("self_attn.v_proj.weight"), s.kv_head_begin * hd, s.kv_heads * hd, 0, hidden, L.qkv);
        append_block(get("self_attn.o_proj.weight"), 0, hidden, s.q_head_begin * hd, s.q_heads * hd, L.o);
        append_block(get("mlp.gate_proj.weight"), s.mlp_begin, s.mlp_size, 0, hidden, L.gate_up);
        append_block(get("mlp.up_proj.weight"), s.mlp_begin, s.mlp_size, 0, hidden, L.gate_up);
        append_block(get("mlp.down_proj.weight"), 0, hidden, s.mlp_begin, s.mlp_size, L.down);
        rank->layers.push_back(std::move(L));
      }
      // A split head: each rank its vocab rows. Unsplit: only rank 0 computes it, from its own
      // copy or, when tied, from the shared embedding.
      const bool needs_copy = s.vocab_split || (r == 0 && !c.tie_word_embeddings);
      if (needs_copy) append_block(head, s.vocab_begin, s.vocab_size, 0, hidden, rank->lm_head);
      const size_t cache_floats = static_cast<size_t>(slots * s.kv_heads * hd);
      for (int64_t l = 0; l < c.num_layers; ++l) {
        rank->k_cache.emplace_back(new float[cache_floats]);
        rank->v_cache.emplace_back(new float[cache_floats]);
      }
      rank->pool = std::make_unique<thread_pool>(per_rank);
      rank->comm = std::move(comms[static_cast<size_t>(r)]);
      ranks_.push_back(std::move(rank));
    }
    return caf::none;
  }

  backend_kind kind() const override { return backend_kind::cpu; }
  const model_config& config() const override { return config_; }
  int tensor_parallel() const override { return tp_; }

  caf::error add_sequence(sequence_id id) override { return blocks_.add_sequence(id); }
  void free_sequence(sequence_id id) override { blocks_.free_sequence(id); }
  int64_t sequence_length(sequence_id id) const override { return blocks_.length(id); }
  kv_cache_stats kv_stats() const override {
    return {blocks_.num_blocks(), blocks_.free_blocks(), blocks_.block_size()};
  }

  expected<std::vector<step_logits>> forward(const std::vector<step_item>& items) override {
    if (items.empty()) return std::vector<step_logits>{};
    auto step = prepare_step(config_, blocks_, items);
    if (!step) return step.error();
    // Allocate everything the step needs here, on the calling thread, so that running out of
    // memory is an error for this step rather than an exception inside a rank thread.
    std::vector<float> logits;
    try {
      logits.resize(step->output_tokens.size() * static_cast<size_t>(config_.vocab_size));
      for (auto& rank : ranks_) reserve_scratch(*rank, static_cast<int64_t>(step->token_ids.size()));
    } catch (const std::bad_alloc&) {
      blocks_.rollback(step->plan);
      return make_error(errc::overloaded, "cpu backend: out of memory for a step of " +
                                              std::to_string(step->token_ids.size()) + " tokens");
    }
    std::vector<caf::error> rank_errors(static_cast<size_t>(tp_));
    rank_pool_->run_on_each([&](int r) {
      rank_errors[static_cast<size_t>(r)] = run_rank(*ranks_[static_cast<size_t>(r)], *step, logits);
    });
    for (auto& err : rank_errors)
      if (err) {
        // The cache slots of this step hold partial data, but lengths did not advance, so
        // nothing reads them; the blocks go back to the pool.
        blocks_.rollback(step->plan);
        return std::move(err);
      }
    blocks_.commit(step->plan);
    return split_logits(items, logits, config_.vocab_size);
  }

private:
  void reserve_scratch(rank_state& R, int64_t n) {
    const auto& s = R.shard;
    const int64_t hidden = config_.hidden_size, hd = config_.head_dim;
    const auto size = [](int64_t v) { return static_cast<size_t>(v); };
    R.x.resize(size(n * hidden));
    R.h.resize(size(n * hidden));
    R.qkv.resize(size(n * (s.q_heads + 2 * s.kv_heads) * hd));
    R.attn.resize(size(n * s.q_heads * hd));
    R.proj.resize(size(n * hidden));
    R.gate_up.resize(size(n * 2 * s.mlp_size));
    R.act.resize(size(n * s.mlp_size));
  }

  // One rank's share of the step (LlamaForCausalLM.forward). Rank 0 writes `logits`. A failing
  // collective ends the rank's work: the in-process one cannot fail, so the other ranks never wait
  // on a rank that left (a device backend would abort its communicator instead).
  caf::error run_rank(rank_state& R, const prepared_step& st, std::vector<float>& logits) {
    const auto& c = config_;
    const auto& s = R.shard;
    const int64_t n = static_cast<int64_t>(st.token_ids.size());
    const int64_t hidden = c.hidden_size, hd = c.head_dim;
    const int64_t q_dim = s.q_heads * hd, kv_dim = s.kv_heads * hd;
    const int64_t qkv_dim = q_dim + 2 * kv_dim;
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto sz = [](int64_t v) { return static_cast<size_t>(v); };

    // LlamaModel.embed_tokens
    for (int64_t t = 0; t < n; ++t)
      std::memcpy(R.x.data() + t * hidden, embed_.data() + int64_t{st.token_ids[sz(t)]} * hidden, sz(hidden) * sizeof(float));

    for (int64_t l = 0; l < c.num_layers; ++l) {
      const auto& L = R.layers[sz(l)];
      // LlamaDecoderLayer: input_layernorm -> self_attn -> residual
      cpu::rms_norm(R.x.data(), L.input_norm.data(), R.h.data(), n, hidden, eps);
      cpu::matmul(R.h.data(), L.qkv.data(), R.qkv.data(), n, hidden, qkv_dim, *R.pool);
      float* k_cache = R.k_cache[sz(l)].get();
      float* v_cache = R.v_cache[sz(l)].get();
      for (int64_t t = 0; t < n; ++t) {
        float* row = R.qkv.data() + t * qkv_dim;
        cpu::apply_rope(row, s.q_heads, hd, st.positions[sz(t)], inv_freq_.data());
        cpu::apply_rope(row + q_dim, s.kv_heads, hd, st.positions[sz(t)], inv_freq_.data());
        std::memcpy(k_cache + st.slots[sz(t)] * kv_dim, row + q_dim, sz(kv_dim) * sizeof(float));
        std::memcpy(v_cache + st.slots[sz(t)] * kv_dim, row + q_dim + kv_dim, sz(kv_dim) * sizeof(float));
      }
      attention(R, st, k_cache, v_cache);
      cpu::matmul(R.attn.data(), L.o.data(), R.proj.data(), n, q_dim, hidden, *R.pool);
      if (auto err = R.comm->all_reduce_sum(R.proj.data(), sz(n * hidden))) return err;
      for (int64_t i = 0; i < n * hidden; ++i) R.x[sz(i)] += R.proj[sz(i)];
      // post_attention_layernorm -> mlp (down(silu(gate) * up)) -> residual
      cpu::rms_norm(R.x.data(), L.post_norm.data(), R.h.data(), n, hidden, eps);
      cpu::matmul(R.h.data(), L.gate_up.data(), R.gate_up.data(), n, hidden, 2 * s.mlp_size, *R.pool);
      for (int64_t t = 0; t < n; ++t) {
        const float* gu = R.gate_up.data() + t * 2 * s.mlp_size;
        cpu::silu_mul(gu, gu + s.mlp_size, R.act.data() + t * s.mlp_size, s.mlp_size);
      }
      cpu::matmul(R.act.data(), L.down.data(), R.proj.data(), n, s.mlp_size, hidden, *R.pool);
      if (auto err = R.comm->all_reduce_sum(R.proj.data(), sz(n * hidden))) return err;
      for (int64_t i = 0; i < n * hidden; ++i) R.x[sz(i)] += R.proj[sz(i)];
    }

    // LlamaModel.norm on the rows whose logits are wanted, then lm_head.
    const auto rows = static_cast<int64_t>(st.output_tokens.size());
    std::vector<float> selected(sz(rows * hidden));
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(selected.data() + i * hidden, R.x.data() + st.output_tokens[sz(i)] * hidden, sz(hidden) * sizeof(float));
    std::vector<float> normed(selected.size());
    cpu::rms_norm(selected.data(), final_norm_.data(), normed.data(), rows, hidden, eps);
    const float* head = R.lm_head.empty() ? embed_.data() : R.lm_head.data();
    if (!s.vocab_split) {
      if (R.comm->rank() == 0) cpu::matmul(normed.data(), head, logits.data(), rows, hidden, c.vocab_size, *R.pool);
      return caf::none;
    }
    R.logits_local.resize(sz(rows * s.vocab_size));
    cpu::matmul(normed.data(), head, R.logits_local.data(), rows, hidden, s.vocab_size, *R.pool);
    // Gather [rank][rows][vocab/tp] and lay it out as [rows][vocab].
    std::vector<float> gathered(sz(tp_ * rows * s.vocab_size));
    if (auto err = R.comm->all_gather(R.logits_local.data(), R.logits_local.size(), gathered.data())) return err;
    if (R.comm->rank() != 0) return caf::none;
    for (int r = 0; r < tp_; ++r)
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(logits.data() + i * c.vocab_size + r * s.vocab_size,
                    gathered.data() + (r * rows + i) * s.vocab_size, sz(s.vocab_size) * sizeof(float));
    return caf::none;
  }

  // Grouped-query causal attention of every new token over its sequence's cached positions
  // (eager_attention_forward: softmax(q k^T * head_dim^-0.5) v, in float32).
  void attention(rank_state& R, const prepared_step& st, const float* k_cache, const float* v_cache) {
    const auto& c = config_;
    const auto& s = R.shard;
    const int64_t hd = c.head_dim;
    const int64_t kv_dim = s.kv_heads * hd, q_dim = s.q_heads * hd, qkv_dim = q_dim + 2 * kv_dim;
    const int64_t group = c.num_heads / c.num_kv_heads;
    const int64_t bs = blocks_.block_size();
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const auto n = static_cast<int64_t>(st.token_ids.size());
    R.pool->parallel_for(n * s.q_heads, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t work = begin; work < end; ++work) {
        const int64_t t = work / s.q_heads, h = work % s.q_heads;
        const int64_t kvh = (s.q_head_begin + h) / group - s.kv_head_begin;
        const float* q = R.qkv.data() + t * qkv_dim + h * hd;
        const auto& p = st.plan[static_cast<size_t>(st.item_of_token[static_cast<size_t>(t)])];
        const auto& table = *p.block_table;
        const int64_t context = st.positions[static_cast<size_t>(t)] + 1;  // causal: itself and before
        scores.resize(static_cast<size_t>(context));
        float max_score = -INFINITY;
        for (int64_t j = 0; j < context; ++j) {
          int64_t slot = int64_t{table[static_cast<size_t>(j / bs)]} * bs + j % bs;
          float sc = cpu::dot(q, k_cache + slot * kv_dim + kvh * hd, hd) * scale;
          scores[static_cast<size_t>(j)] = sc;
          max_score = std::max(max_score, sc);
        }
        float sum = 0;
        for (auto& sc : scores) {
          sc = std::exp(sc - max_score);
          sum += sc;
        }
        float* out = R.attn.data() + t * q_dim + h * hd;
        std::fill(out, out + hd, 0.0f);
        for (int64_t j = 0; j < context; ++j) {
          int64_t slot = int64_t{table[static_cast<size_t>(j / bs)]} * bs + j % bs;
          const float* v = v_cache + slot * kv_dim + kvh * hd;
          float w = scores[static_cast<size_t>(j)] / sum;
          for (int64_t d = 0; d < hd; ++d) out[d] += w * v[d];
        }
      }
    });
  }

  model_config config_;
  int tp_;
  std::vector<float> inv_freq_;
  std::vector<float> embed_, final_norm_;
  kv_cache_geometry geometry_;
  kv_block_manager blocks_;
  std::unique_ptr<thread_pool> rank_pool_;
  std::vector<std::unique_ptr<rank_state>> ranks_;
};

} // namespace

expected<std::unique_ptr<backend>> make_cpu_backend(const checkpoint& weights, const backend_options& options) {
  const auto& c = weights.config();
  if (auto err = check_tensor_parallel(c, options.tensor_parallel)) return err;
  if (options.kv_block_size < 1 || options.kv_block_size > 4096)
    return make_error(errc::invalid_argument, "kv_block_size must be in [1, 4096]");
  if (options.threads < 0) return make_error(errc::invalid_argument, "threads must be >= 0");
  try {
    auto b = std::make_unique<cpu_backend>(c, options);
    if (auto err = b->init(weights, options)) return err;
    return std::unique_ptr<backend>(std::move(b));
  } catch (const std::bad_alloc&) {
    return make_error(errc::limit_exceeded, weights.directory() + ": not enough memory for the float32 weights (" +
                                                std::to_string(weights.weight_bytes()) + " bytes stored) plus a " +
                                                std::to_string(options.kv_cache_bytes) + "-byte KV cache");
  }
}

} // namespace triplane::gpu
