// The CUDA backend's own kernels, written for obvious correctness first (issue 6 makes them fast):
// float32 math everywhere, 16-bit values only where they are stored (weights, normalised
// activations, the KV cache). Each mirrors a function of the CPU reference backend.
#include "kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace triplane::gpu::cuda {

namespace {

// 16-bit storage <-> float32.
template <typename T> __device__ inline float load(const T* p, int64_t i);
template <> __device__ inline float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <> __device__ inline float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }

template <typename T> __device__ inline T store(float v);
template <> __device__ inline __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ inline __half store<__half>(float v) { return __float2half_rn(v); }

inline unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

// ---- embedding -------------------------------------------------------------------------------

template <typename T>
__global__ void embed_gather_kernel(const T* table, const int32_t* ids, float* x, int64_t hidden) {
  const int64_t t = blockIdx.x;
  const T* row = table + int64_t{ids[t]} * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) x[t * hidden + i] = load(row, i);
}

// ---- RMSNorm (with the residual add fused in front) -------------------------------------------

constexpr int norm_threads = 256;

template <typename T>
__global__ void add_rms_norm_kernel(float* x, const float* delta, const int32_t* rows, const T* weight, T* out,
                                    int64_t n, float eps) {
  const int64_t i = blockIdx.x;
  const int64_t r = rows != nullptr ? int64_t{rows[i]} : i;
  float* xr = x + r * n;
  const float* dr = delta != nullptr ? delta + r * n : nullptr;
  float sum = 0.0f;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    float v = xr[k];
    if (dr != nullptr) {
      v += dr[k];
      xr[k] = v;  // each element is read and written by the same thread only
    }
    sum += v * v;
  }
  __shared__ float partial[norm_threads / 32];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < norm_threads / 32; ++w) total += partial[w];
  const float inv = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  T* o = out + i * n;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) o[k] = store<T>(load(weight, k) * (xr[k] * inv));
}

// ---- RoPE + KV-cache append -------------------------------------------------------------------

// One block per token; threads over (head, i < head_dim / 2) of the q and k heads, then over the
// v elements. Same float32 formula as cpu::apply_rope.
template <typename T>
__global__ void rope_append_kernel(float* qkv, const int64_t* positions, const int64_t* slots, const float* inv_freq,
                                   T* k_cache, T* v_cache, int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t t = blockIdx.x;
  const int64_t half = head_dim / 2;
  const int64_t q_dim = q_heads * head_dim, kv_dim = kv_heads * head_dim;
  float* row = qkv + t * (q_dim + 2 * kv_dim);
  const float pos = static_cast<float>(positions[t]);
  const int64_t slot = slots[t];
  for (int64_t w = threadIdx.x; w < (q_heads + kv_heads) * half; w += blockDim.x) {
    const int64_t h = w / half, i = w % half;
    const float freq = pos * inv_freq[i];
    const float c = cosf(freq), s = sinf(freq);
    float* head = row + h * head_dim;  // q heads, then (h >= q_heads) the k heads right after them
    const float x1 = head[i], x2 = head[i + half];
    const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
    if (h < q_heads) {
      head[i] = y1;
      head[i + half] = y2;
    } else {
      T* k = k_cache + slot * kv_dim + (h - q_heads) * head_dim;
      k[i] = store<T>(y1);
      k[i + half] = store<T>(y2);
    }
  }
  const float* v = row + q_dim + kv_dim;
  for (int64_t e = threadIdx.x; e < kv_dim; e += blockDim.x) v_cache[slot * kv_dim + e] = store<T>(v[e]);
}

// ---- attention over the paged cache -----------------------------------------------------------

constexpr int attention_warps = 4;
constexpr int per_lane = static_cast<int>(max_head_dim / 32);

// One block per (token, query head). Each warp walks every attention_warps-th key of the context
// with an online softmax (running max m, sum l, weighted values acc; element d of a head lives in
// lane d % 32, register d / 32); the warps' partial results are merged at the end.
template <typename T>
__global__ void paged_attention_kernel(attention_args a) {
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t hd = a.head_dim;
  const int64_t q_dim = a.q_heads * hd, kv_dim = a.kv_heads * hd;
  const int64_t kvh = (a.q_head_begin + h) / a.group - a.kv_head_begin;
  const float* q = a.qkv + t * (q_dim + 2 * kv_dim) + h * hd;
  const int32_t* table = a.block_tables + int64_t{a.token_sequence[t]} * a.max_blocks;
  const int64_t context = a.positions[t] + 1;
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);

  float qv[per_lane], acc[per_lane];
#pragma unroll
  for (int r = 0; r < per_lane; ++r) {
    const int64_t d = r * 32 + lane;
    qv[r] = d < hd ? q[d] * a.scale : 0.0f;
    acc[r] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = warp; j < context; j += attention_warps) {
    const int64_t slot = int64_t{table[j / a.block_size]} * a.block_size + j % a.block_size;
    const T* k = k_cache + slot * kv_dim + kvh * hd;
    const T* v = v_cache + slot * kv_dim + kvh * hd;
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < per_lane; ++r) {
      const int64_t d = r * 32 + lane;
      if (d < hd) s += qv[r] * load(k, d);
    }
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float p = expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int r = 0; r < per_lane; ++r) {
      const int64_t d = r * 32 + lane;
      acc[r] = acc[r] * correction + (d < hd ? p * load(v, d) : 0.0f);
    }
    m = m_new;
  }

  __shared__ float warp_m[attention_warps], warp_l[attention_warps];
  __shared__ float warp_acc[attention_warps][max_head_dim];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int r = 0; r < per_lane; ++r) {
    const int64_t d = r * 32 + lane;
    if (d < hd) warp_acc[warp][d] = acc[r];
  }
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < attention_warps; ++w) m_all = fmaxf(m_all, warp_m[w]);  // finite: context >= 1
  float l_all = 0.0f;
  float weight[attention_warps];
  for (int w = 0; w < attention_warps; ++w) {
    weight[w] = warp_l[w] > 0.0f ? expf(warp_m[w] - m_all) : 0.0f;  // a warp without keys adds nothing
    l_all += warp_l[w] * weight[w];
  }
  T* out = static_cast<T*>(a.out) + t * q_dim + h * hd;
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float v = 0.0f;
    for (int w = 0; w < attention_warps; ++w) v += warp_acc[w][d] * weight[w];
    out[d] = store<T>(v / l_all);
  }
}

// ---- SwiGLU ----------------------------------------------------------------------------------

template <typename T>
__global__ void silu_mul_kernel(const float* gate_up, T* act, int64_t n, int64_t mlp) {
  const int64_t total = n * mlp;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = e / mlp, i = e % mlp;
    const float g = gate_up[t * 2 * mlp + i];
    const float u = gate_up[t * 2 * mlp + mlp + i];
    act[e] = store<T>((g / (1.0f + expf(-g))) * u);
  }
}

template <typename T>
cudaError_t launch_attention(const attention_args& a, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(a.n), static_cast<unsigned>(a.q_heads));
  paged_attention_kernel<T><<<grid, attention_warps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

} // namespace

cudaError_t embed_gather(elem_type elem, const void* table, const int32_t* ids, float* x, int64_t n, int64_t hidden,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(n);
  if (elem == elem_type::bf16)
    embed_gather_kernel<<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(table), ids, x, hidden);
  else
    embed_gather_kernel<<<grid, 256, 0, stream>>>(static_cast<const __half*>(table), ids, x, hidden);
  return cudaGetLastError();
}

cudaError_t add_rms_norm(elem_type elem, float* x, const float* delta, const int32_t* rows, const void* weight,
                         void* out, int64_t out_rows, int64_t n, float eps, cudaStream_t stream) {
  if (out_rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(out_rows);
  if (elem == elem_type::bf16)
    add_rms_norm_kernel<<<grid, norm_threads, 0, stream>>>(x, delta, rows, static_cast<const __nv_bfloat16*>(weight),
                                                           static_cast<__nv_bfloat16*>(out), n, eps);
  else
    add_rms_norm_kernel<<<grid, norm_threads, 0, stream>>>(x, delta, rows, static_cast<const __half*>(weight),
                                                           static_cast<__half*>(out), n, eps);
  return cudaGetLastError();
}

cudaError_t rope_append(elem_type elem, float* qkv, const int64_t* positions, const int64_t* slots,
                        const float* inv_freq, void* k_cache, void* v_cache, int64_t n, int64_t q_heads,
                        int64_t kv_heads, int64_t head_dim, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(n);
  if (elem == elem_type::bf16)
    rope_append_kernel<<<grid, 256, 0, stream>>>(qkv, positions, slots, inv_freq,
                                                 static_cast<__nv_bfloat16*>(k_cache),
                                                 static_cast<__nv_bfloat16*>(v_cache), q_heads, kv_heads, head_dim);
  else
    rope_append_kernel<<<grid, 256, 0, stream>>>(qkv, positions, slots, inv_freq, static_cast<__half*>(k_cache),
                                                 static_cast<__half*>(v_cache), q_heads, kv_heads, head_dim);
  return cudaGetLastError();
}

cudaError_t paged_attention(elem_type elem, const attention_args& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  if (args.head_dim > max_head_dim || args.head_dim < 1) return cudaErrorInvalidValue;
  return elem == elem_type::bf16 ? launch_attention<__nv_bfloat16>(args, stream)
                                 : launch_attention<__half>(args, stream);
}

cudaError_t silu_mul(elem_type elem, const float* gate_up, void* act, int64_t n, int64_t mlp, cudaStream_t stream) {
  if (n * mlp == 0) return cudaSuccess;
  const unsigned grid = std::min(blocks_for(n * mlp, 256), 65535u);
  if (elem == elem_type::bf16)
    silu_mul_kernel<<<grid, 256, 0, stream>>>(gate_up, static_cast<__nv_bfloat16*>(act), n, mlp);
  else
    silu_mul_kernel<<<grid, 256, 0, stream>>>(gate_up, static_cast<__half*>(act), n, mlp);
  return cudaGetLastError();
}

} // namespace triplane::gpu::cuda
