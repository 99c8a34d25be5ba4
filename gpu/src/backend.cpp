// Backend selection and the tensor-parallel sharding rules shared by all backends.
#include "triplane/gpu/backend.hpp"

#include "triplane/gpu/checkpoint.hpp"

namespace triplane::gpu {

const char* to_string(backend_kind kind) {
  return kind == backend_kind::cpu ? "cpu" : "cuda";
}

caf::error check_tensor_parallel(const model_config& c, int tp) {
  auto bad = [&](const std::string& why) {
    return make_error(errc::invalid_argument, "tensor parallelism " + std::to_string(tp) + ": " + why);
  };
  if (tp < 1 || tp > 64) return bad("must be between 1 and 64");
  if (c.num_heads % tp != 0)
    return bad("num_attention_heads (" + std::to_string(c.num_heads) + ") is not divisible by it");
  if (c.intermediate_size % tp != 0)
    return bad("intermediate_size (" + std::to_string(c.intermediate_size) + ") is not divisible by it");
  if (c.num_kv_heads % tp != 0 && tp % c.num_kv_heads != 0)
    return bad("num_key_value_heads (" + std::to_string(c.num_kv_heads) +
               ") neither divides it nor is divisible by it");
  return caf::none;
}

tp_shard shard_for_rank(const model_config& c, int tp, int rank) {
  tp_shard s;
  s.q_heads = c.num_heads / tp;
  s.q_head_begin = s.q_heads * rank;
  const int64_t group = c.num_heads / c.num_kv_heads;  // query heads per KV head
  s.kv_head_begin = s.q_head_begin / group;
  s.kv_heads = (s.q_head_begin + s.q_heads - 1) / group - s.kv_head_begin + 1;
  s.mlp_size = c.intermediate_size / tp;
  s.mlp_begin = s.mlp_size * rank;
  s.vocab_split = tp > 1 && c.vocab_size % tp == 0;
  s.vocab_size = s.vocab_split ? c.vocab_size / tp : c.vocab_size;
  s.vocab_begin = s.vocab_split ? s.vocab_size * rank : 0;
  return s;
}

expected<std::unique_ptr<backend>> make_backend(const checkpoint& weights, const backend_options& options) {
  switch (options.kind) {
    case backend_kind::cpu:
      return make_cpu_backend(weights, options);
    case backend_kind::cuda:
#ifdef TRIPLANE_GPU_WITH_CUDA
      return make_cuda_backend(weights, options);
#else
      return make_error(errc::unavailable,
                        "the CUDA backend is not part of this build (use --backend cpu)");
#endif
  }
  return make_error(errc::invalid_argument, "unknown backend kind");
}

expected<prepared_step> prepare_step(const model_config& config, kv_block_manager& blocks,
                                     const std::vector<step_item>& items) {
  std::vector<sequence_id> ids;
  std::vector<int64_t> counts;
  for (const auto& item : items) {
    const std::string who = "sequence " + std::to_string(item.sequence);
    if (item.tokens.empty()) return make_error(errc::invalid_argument, who + ": no tokens in step");
    for (auto t : item.tokens)
      if (t < 0 || t >= config.vocab_size)
        return make_error(errc::invalid_argument, who + ": token id " + std::to_string(t) + " outside [0, " +
                                                      std::to_string(config.vocab_size) + ")");
    const int64_t len = blocks.length(item.sequence);
    if (len < 0) return make_error(errc::not_found, who + " is not registered");
    const int64_t total = len + static_cast<int64_t>(item.tokens.size());
    if (total > config.max_position_embeddings)
      return make_error(errc::limit_exceeded, who + ": " + std::to_string(total) +
                                                  " tokens exceed max_position_embeddings " +
                                                  std::to_string(config.max_position_embeddings));
    ids.push_back(item.sequence);
    counts.push_back(static_cast<int64_t>(item.tokens.size()));
  }
  auto plan = blocks.plan(ids, counts);
  if (!plan) return plan.error();
  prepared_step step;
  step.plan = std::move(*plan);
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& p = step.plan[i];
    for (int64_t t = 0; t < p.num_tokens; ++t) {
      if (items[i].all_logits || t == p.num_tokens - 1)
        step.output_tokens.push_back(static_cast<int64_t>(step.token_ids.size()));
      step.token_ids.push_back(items[i].tokens[static_cast<size_t>(t)]);
      step.positions.push_back(p.start_position + t);
      step.slots.push_back(p.slots[static_cast<size_t>(t)]);
      step.item_of_token.push_back(static_cast<int32_t>(i));
    }
  }
  return step;
}

std::vector<step_logits> split_logits(const std::vector<step_item>& items, const std::vector<float>& logits,
                                      int64_t vocab) {
  std::vector<step_logits> out(items.size());
  size_t offset = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t rows = items[i].all_logits ? static_cast<int64_t>(items[i].tokens.size()) : 1;
    const size_t count = static_cast<size_t>(rows * vocab);
    out[i].rows = rows;
    out[i].values.assign(logits.begin() + static_cast<std::ptrdiff_t>(offset),
                         logits.begin() + static_cast<std::ptrdiff_t>(offset + count));
    offset += count;
  }
  return out;
}

} // namespace triplane::gpu
