// Reading (memory-mapped, validated) and writing safetensors files, and the half-precision
// conversions the CPU backend needs. Tensor data in a safetensors file may be unaligned: read it
// only through the conversion functions here (memcpy based), never by casting the pointer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

enum class dtype { f32, f16, bf16, f64, i64, i32, i16, i8, u8, boolean };

/// Bytes per element.
size_t dtype_size(dtype t);
/// The safetensors spelling: "F32", "BF16", ...
const char* dtype_name(dtype t);

/// A tensor inside a mapped file. `data` points into the mapping (possibly unaligned) and stays
/// valid as long as the owning safetensors_file lives.
struct tensor_view {
  std::string name;
  dtype type = dtype::f32;
  std::vector<int64_t> shape;
  const unsigned char* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
};

/// "[384, 128]"
std::string shape_string(const std::vector<int64_t>& shape);

/// A read-only, memory-mapped safetensors file whose header has been fully validated: the header
/// length fits the file, the header is a JSON object, every dtype is known, every shape is
/// non-negative, every tensor's data_offsets lie inside the data section, are sized exactly
/// numel * dtype_size, and no two tensors overlap. Unknown dtypes and all of the above are
/// errc::corrupted errors naming the file and the tensor.
class safetensors_file {
public:
  static expected<std::unique_ptr<safetensors_file>> open(const std::string& path);
  ~safetensors_file();
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<tensor_view>& tensors() const { return tensors_; }
  /// The tensor called `name`, or nullptr.
  const tensor_view* find(std::string_view name) const;

private:
  safetensors_file() = default;
  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::vector<tensor_view> tensors_;
  std::unordered_map<std::string, size_t> index_;  ///< name -> position in tensors_
};

// Scalar conversions. bf16 -> f32 is exact; f16 -> f32 is exact including subnormals, inf and nan.
float bf16_to_f32(uint16_t bits);
float f16_to_f32(uint16_t bits);
/// Round to nearest even; nan stays nan.
uint16_t f32_to_bf16(float value);
uint16_t f32_to_f16(float value);

/// Converts elements [first, first + count) of a float tensor (F32, F16 or BF16) to float32 into
/// `out`. Safe for unaligned data. Precondition (checked by the caller): first + count <= numel.
/// Returns false (converting nothing) for a non-float dtype.
bool convert_to_f32(const tensor_view& t, int64_t first, int64_t count, float* out);

/// The whole tensor as float32 (F32/F16/BF16), or an invalid_argument error naming it.
expected<std::vector<float>> tensor_to_f32(const tensor_view& t, const std::string& file);
/// The whole tensor as int64 (I64 or I32), or an invalid_argument error naming it.
expected<std::vector<int64_t>> tensor_to_i64(const tensor_view& t, const std::string& file);

/// A tensor to write: `data` holds numel * dtype_size bytes in little-endian order.
struct tensor_to_write {
  std::string name;
  dtype type = dtype::f32;
  std::vector<int64_t> shape;
  std::vector<unsigned char> data;
};

/// Makes a tensor_to_write from floats / int64s.
tensor_to_write make_f32_tensor(std::string name, std::vector<int64_t> shape, const std::vector<float>& values);
tensor_to_write make_i64_tensor(std::string name, std::vector<int64_t> shape, const std::vector<int64_t>& values);

/// Writes a safetensors file (header padded with spaces to 8 bytes; tensors in the given order).
/// Errors: invalid_argument when a tensor's byte size does not match its shape or names repeat,
/// io_error when the file cannot be written.
caf::error write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors);

} // namespace triplane::gpu
