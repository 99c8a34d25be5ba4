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

} // namespace triplane::gpu
