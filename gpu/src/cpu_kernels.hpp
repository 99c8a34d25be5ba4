// Float32 building blocks of the CPU reference backend. Each is the plain definition of the
// operation as transformers computes it; the matmul is the only one tuned (weights row-major and
// contiguous, several rows per pass, threads over output rows).
#pragma once

#include <cstdint>

#include "thread_pool.hpp"

namespace triplane::gpu::cpu {

/// y[t, o] = sum_i x[t, i] * w[o, i] for t < tokens, o < out; x is [tokens, in], w is [out, in]
/// (a PyTorch Linear weight), y is [tokens, out]. Parallel over output rows.
void matmul(const float* x, const float* w, float* y, int64_t tokens, int64_t in, int64_t out, thread_pool& pool);

/// out[t] = weight * (x[t] * rsqrt(mean(x[t]^2) + eps)), for rows of length n (transformers'
/// LlamaRMSNorm in float32).
void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t n, float eps);

/// Rotate-half RoPE in place on `heads` vectors of `head_dim` at `position`.
/// inv_freq holds head_dim / 2 entries.
void apply_rope(float* v, int64_t heads, int64_t head_dim, int64_t position, const float* inv_freq);

/// out[i] = silu(gate[i]) * up[i]
void silu_mul(const float* gate, const float* up, float* out, int64_t n);

/// dot product of two float vectors (the matmul's inner kernel, exposed for attention).
float dot(const float* a, const float* b, int64_t n);

} // namespace triplane::gpu::cpu
