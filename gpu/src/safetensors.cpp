// safetensors reading (mmap + validation), writing, and half-precision conversion.
#include "triplane/gpu/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include "json.hpp"

namespace triplane::gpu {

size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f64: case dtype::i64: return 8;
    case dtype::f32: case dtype::i32: return 4;
    case dtype::f16: case dtype::bf16: case dtype::i16: return 2;
    case dtype::i8: case dtype::u8: case dtype::boolean: return 1;
  }
  return 0;
}

const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::f64: return "F64";
    case dtype::i64: return "I64";
    case dtype::i32: return "I32";
    case dtype::i16: return "I16";
    case dtype::i8: return "I8";
    case dtype::u8: return "U8";
    case dtype::boolean: return "BOOL";
  }
  return "?";
}

namespace {

bool dtype_from_name(const std::string& s, dtype& out) {
  static const dtype all[] = {dtype::f32, dtype::f16, dtype::bf16, dtype::f64, dtype::i64,
                              dtype::i32, dtype::i16, dtype::i8, dtype::u8, dtype::boolean};
  for (auto t : all)
    if (s == dtype_name(t)) {
      out = t;
      return true;
    }
  return false;
}

// The safetensors reference implementation caps headers at 100 MB.
constexpr uint64_t max_header_bytes = 100u * 1024u * 1024u;

caf::error corrupt(const std::string& path, const std::string& what) {
  return make_error(errc::corrupted, path + ": " + what);
}

caf::error corrupt_tensor(const std::string& path, const std::string& tensor, const std::string& what) {
  return make_error(errc::corrupted, path + ": tensor '" + tensor + "': " + what);
}

} // namespace

int64_t tensor_view::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

expected<std::unique_ptr<safetensors_file>> safetensors_file::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return make_error(e == ENOENT ? errc::not_found : errc::io_error,
                      path + ": cannot open: " + std::strerror(e));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return make_error(errc::io_error, path + ": not a regular file");
  }
  auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return corrupt(path, "file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) return make_error(errc::io_error, path + ": mmap failed: " + std::strerror(map_errno));

  std::unique_ptr<safetensors_file> file(new safetensors_file());
  file->path_ = path;
  file->mapping_ = map;
  file->mapping_size_ = file_size;
  const auto* bytes = static_cast<const unsigned char*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little-endian u64
  if (header_len > max_header_bytes)
    return corrupt(path, "header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
  if (header_len > file_size - 8)
    return corrupt(path, "header length " + std::to_string(header_len) + " exceeds the file size " +
                             std::to_string(file_size) + " (truncated file or bad header)");
  std::string_view header(reinterpret_cast<const char*>(bytes + 8), header_len);
  json::value root;
  std::string parse_error;
  if (!json::parse(header, root, parse_error)) return corrupt(path, "header is not valid JSON: " + parse_error);
  if (root.type != json::kind::object) return corrupt(path, "header is not a JSON object");

  const uint64_t data_size = file_size - 8 - header_len;
  const unsigned char* data = bytes + 8 + header_len;
  struct extent {
    uint64_t begin, end;
    size_t index;
  };
  std::vector<extent> extents;
  for (const auto& [name, entry] : root.object) {
    if (name == "__metadata__") {
      if (entry.type != json::kind::object) return corrupt(path, "__metadata__ is not an object");
      continue;
    }
    if (entry.type != json::kind::object) return corrupt_tensor(path, name, "entry is not an object");
    const auto* dt = entry.find("dtype");
    const auto* shape = entry.find("shape");
    const auto* offsets = entry.find("data_offsets");
    if (dt == nullptr || dt->type != json::kind::string) return corrupt_tensor(path, name, "missing string 'dtype'");
    tensor_view view;
    view.name = name;
    if (!dtype_from_name(dt->string, view.type))
      return corrupt_tensor(path, name, "unsupported dtype '" + dt->string + "'");
    if (shape == nullptr || shape->type != json::kind::array)
      return corrupt_tensor(path, name, "missing array 'shape'");
    uint64_t numel = 1;
    for (const auto& d : shape->array) {
      if (d.type != json::kind::number || !d.is_integer || d.integer < 0)
        return corrupt_tensor(path, name, "shape holds something other than a non-negative integer");
      view.shape.push_back(d.integer);
      auto dim = static_cast<uint64_t>(d.integer);
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim)
        return corrupt_tensor(path, name, "shape " + shape_string(view.shape) + " overflows");
      numel *= dim;
    }
    if (offsets == nullptr || offsets->type != json::kind::array || offsets->array.size() != 2)
      return corrupt_tensor(path, name, "missing 'data_offsets' [begin, end]");
    for (const auto& o : offsets->array)
      if (o.type != json::kind::number || !o.is_integer || o.integer < 0)
        return corrupt_tensor(path, name, "data_offsets hold something other than non-negative integers");
    auto begin = static_cast<uint64_t>(offsets->array[0].integer);
    auto end = static_cast<uint64_t>(offsets->array[1].integer);
    if (begin > end)
      return corrupt_tensor(path, name, "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                                            "] are reversed");
    if (end > data_size)
      return corrupt_tensor(path, name, "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                                            "] exceed the data section of " + std::to_string(data_size) +
                                            " bytes (truncated file?)");
    uint64_t elem = dtype_size(view.type);
    if (numel > std::numeric_limits<uint64_t>::max() / elem || numel * elem != end - begin)
      return corrupt_tensor(path, name, "holds " + std::to_string(end - begin) + " bytes but shape " +
                                            shape_string(view.shape) + " of " + dt->string + " needs " +
                                            std::to_string(numel * elem));
    view.data = data + begin;
    view.nbytes = static_cast<size_t>(end - begin);
    extents.push_back({begin, end, file->tensors_.size()});
    file->tensors_.push_back(std::move(view));
  }
  std::sort(extents.begin(), extents.end(), [](const extent& a, const extent& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Empty tensors occupy no bytes; every non-empty one must start at or after the furthest end
  // of the non-empty ones before it.
  const extent* furthest = nullptr;
  for (const auto& cur : extents) {
    if (cur.end == cur.begin) continue;
    if (furthest != nullptr && cur.begin < furthest->end)
      return corrupt(path, "tensors '" + file->tensors_[furthest->index].name + "' and '" +
                               file->tensors_[cur.index].name + "' overlap");
    if (furthest == nullptr || cur.end > furthest->end) furthest = &cur;
  }
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_.emplace(file->tensors_[i].name, i);
  return file;
}

safetensors_file::~safetensors_file() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

const tensor_view* safetensors_file::find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

float bf16_to_f32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t u;
  if (exponent == 0x1F) {
    u = sign | 0x7F800000u | (mantissa << 13);  // inf or nan (payload kept)
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else if (mantissa == 0) {
    u = sign;  // signed zero
  } else {
    // Subnormal: value = mantissa * 2^-24, exactly representable as a normal float.
    float f = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

uint16_t f32_to_f16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                         // below the smallest normal half (2^-14)
    float f;
    std::memcpy(&f, &abs, 4);
    // Subnormal half: round f / 2^-24 to nearest even.
    float scaled = f * 16777216.0f;  // exact (power of two)
    auto m = static_cast<uint32_t>(std::nearbyint(scaled));
    return sign | static_cast<uint16_t>(m);
  }
  uint32_t mant = abs & 0x7FFFFFu;
  uint32_t exp = (abs >> 23) - 112;
  uint32_t half = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

bool convert_to_f32(const tensor_view& t, int64_t first, int64_t count, float* out) {
  const unsigned char* p = t.data + static_cast<size_t>(first) * dtype_size(t.type);
  switch (t.type) {
    case dtype::f32:
      std::memcpy(out, p, static_cast<size_t>(count) * 4);
      return true;
    case dtype::bf16:
      for (int64_t i = 0; i < count; ++i) {
        uint16_t b;
        std::memcpy(&b, p + 2 * i, 2);
        out[i] = bf16_to_f32(b);
      }
      return true;
    case dtype::f16:
      for (int64_t i = 0; i < count; ++i) {
        uint16_t b;
        std::memcpy(&b, p + 2 * i, 2);
        out[i] = f16_to_f32(b);
      }
      return true;
    default:
      return false;
  }
}

expected<std::vector<float>> tensor_to_f32(const tensor_view& t, const std::string& file) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (!convert_to_f32(t, 0, t.numel(), out.data()))
    return make_error(errc::invalid_argument, file + ": tensor '" + t.name + "' has dtype " + dtype_name(t.type) +
                                                  ", expected F32, F16 or BF16");
  return out;
}

expected<std::vector<int64_t>> tensor_to_i64(const tensor_view& t, const std::string& file) {
  std::vector<int64_t> out(static_cast<size_t>(t.numel()));
  if (t.type == dtype::i64) {
    std::memcpy(out.data(), t.data, t.nbytes);
  } else if (t.type == dtype::i32) {
    for (size_t i = 0; i < out.size(); ++i) {
      int32_t v;
      std::memcpy(&v, t.data + 4 * i, 4);
      out[i] = v;
    }
  } else {
    return make_error(errc::invalid_argument, file + ": tensor '" + t.name + "' has dtype " + dtype_name(t.type) +
                                                  ", expected I64 or I32");
  }
  return out;
}

tensor_to_write make_f32_tensor(std::string name, std::vector<int64_t> shape, const std::vector<float>& values) {
  tensor_to_write t{std::move(name), dtype::f32, std::move(shape), {}};
  t.data.resize(values.size() * 4);
  std::memcpy(t.data.data(), values.data(), t.data.size());
  return t;
}

tensor_to_write make_i64_tensor(std::string name, std::vector<int64_t> shape, const std::vector<int64_t>& values) {
  tensor_to_write t{std::move(name), dtype::i64, std::move(shape), {}};
  t.data.resize(values.size() * 8);
  std::memcpy(t.data.data(), values.data(), t.data.size());
  return t;
}

namespace {

std::string json_escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out;
}

} // namespace

caf::error write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors) {
  std::string header = "{";
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& t : tensors) {
    if (!names.insert(t.name).second || t.name == "__metadata__")
      return make_error(errc::invalid_argument, path + ": tensor name '" + t.name + "' repeated or reserved");
    uint64_t numel = 1;
    for (auto d : t.shape) {
      if (d < 0) return make_error(errc::invalid_argument, path + ": tensor '" + t.name + "' has a negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * dtype_size(t.type) != t.data.size())
      return make_error(errc::invalid_argument, path + ": tensor '" + t.name + "' holds " +
                                                    std::to_string(t.data.size()) + " bytes, shape " +
                                                    shape_string(t.shape) + " needs " +
                                                    std::to_string(numel * dtype_size(t.type)));
    if (header.size() > 1) header += ",";
    header += "\"" + json_escape(t.name) + "\":{\"dtype\":\"" + dtype_name(t.type) + "\",\"shape\":" +
              shape_string(t.shape) + ",\"data_offsets\":[" + std::to_string(offset) + "," +
              std::to_string(offset + t.data.size()) + "]}";
    offset += t.data.size();
  }
  header += "}";
  while ((8 + header.size()) % 8 != 0) header += ' ';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return make_error(errc::io_error, path + ": cannot create: " + std::strerror(errno));
  unsigned char len[8];
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const auto& t : tensors) out.write(reinterpret_cast<const char*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
  out.close();
  if (!out) return make_error(errc::io_error, path + ": write failed");
  return caf::none;
}

} // namespace triplane::gpu
