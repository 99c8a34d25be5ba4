// Launchers of the CUDA backend's own kernels (everything but the matrix products, which are
// cuBLAS). One launcher per op; each enqueues on `stream` and returns the launch status
// (cudaGetLastError), never synchronises. Tensors are row-major; `elem` says whether the 16-bit
// buffers (weights, normalised activations, the KV cache) hold bf16 or f16 values. Every kernel
// here has a float32 twin in cpu_kernels.cpp / cpu_backend.cpp, which is its reference.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace triplane::gpu::cuda {

enum class elem_type { bf16, f16 };

/// Largest head_dim the attention kernel handles (8 elements per lane of a warp).
constexpr int64_t max_head_dim = 256;

/// x[t, :] = float(table[ids[t], :]) for t < n. ids must be in [0, vocab) (checked on the host).
cudaError_t embed_gather(elem_type elem, const void* table, const int32_t* ids, float* x, int64_t n,
                         int64_t hidden, cudaStream_t stream);

/// For each output row i (source row r = rows ? rows[i] : i): v = x[r] + (delta ? delta[r] : 0);
/// when delta is given x[r] := v (the residual add); out[i] = elem(weight * (v * rsqrt(mean(v^2) +
/// eps))) computed in float32 and rounded once (LlamaRMSNorm in float32, then the cast).
cudaError_t add_rms_norm(elem_type elem, float* x, const float* delta, const int32_t* rows,
                         const void* weight, void* out, int64_t out_rows, int64_t n, float eps,
                         cudaStream_t stream);

/// Per token t: rotate-half RoPE at positions[t] on the q heads of qkv[t] (in place, float32) and
/// on its k heads; then the rotated k and the v heads are stored (as elem) at cache slot slots[t]
/// of k_cache / v_cache, each [slots, kv_heads, head_dim]. qkv rows are [q | k | v].
cudaError_t rope_append(elem_type elem, float* qkv, const int64_t* positions, const int64_t* slots,
                        const float* inv_freq, void* k_cache, void* v_cache, int64_t n, int64_t q_heads,
                        int64_t kv_heads, int64_t head_dim, cudaStream_t stream);

/// What the attention kernel needs to find each token's context in the paged cache.
struct attention_args {
  const float* qkv = nullptr;          ///< [n, (q_heads + 2 kv_heads) * head_dim], q already rotated
  const void* k_cache = nullptr;       ///< [slots, kv_heads, head_dim]
  const void* v_cache = nullptr;
  const int32_t* block_tables = nullptr;  ///< [sequences, max_blocks]
  const int32_t* token_sequence = nullptr;  ///< [n]: row of block_tables
  const int64_t* positions = nullptr;  ///< [n]: the token attends to positions [0, position]
  void* out = nullptr;                 ///< [n, q_heads * head_dim], elem
  int64_t n = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t group = 1;                   ///< query heads per KV head (of the whole model)
  int64_t q_head_begin = 0, kv_head_begin = 0;  ///< this rank's first global heads
  int64_t max_blocks = 0, block_size = 0;
  float scale = 1.0f;                  ///< head_dim^-0.5
};
/// Causal grouped-query attention of every token over its cached context (float32 softmax).
/// Requires head_dim <= max_head_dim.
cudaError_t paged_attention(elem_type elem, const attention_args& args, cudaStream_t stream);

/// act[t, i] = elem(silu(gate_up[t, i]) * gate_up[t, mlp + i]) for i < mlp.
cudaError_t silu_mul(elem_type elem, const float* gate_up, void* act, int64_t n, int64_t mlp,
                     cudaStream_t stream);

} // namespace triplane::gpu::cuda
