// write_random_llama: what it writes is a checkpoint the loader accepts, with the generator's values.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include <unistd.h>

#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/random_model.hpp"

using namespace triplane::gpu;

namespace {

struct temp_dir {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("triplane-random-model-" + std::to_string(::getpid()));
  ~temp_dir() { std::filesystem::remove_all(path); }
};

random_llama_spec small_spec() {
  random_llama_spec spec;
  spec.vocab_size = 64;
  spec.hidden_size = 32;
  spec.intermediate_size = 48;
  spec.num_layers = 2;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 8;
  return spec;
}

} // namespace

TEST_CASE("a random Llama written from a spec opens as a checkpoint with that config", "[gpu][checkpoint]") {
  temp_dir dir;
  auto spec = small_spec();
  spec.llama3_rope_scaling = true;
  int norms = 0;
  int weights = 0;
  REQUIRE_FALSE(write_random_llama(dir.path.string(), spec, [&](bool norm) {
    (norm ? norms : weights)++;
    return norm ? 1.0f : 0.5f;
  }));
  auto ckpt = checkpoint::open(dir.path.string());
  INFO((ckpt ? std::string{"ok"} : triplane::describe(ckpt.error())));
  REQUIRE(ckpt);
  const auto& c = (*ckpt)->config();
  CHECK(c.vocab_size == 64);
  CHECK(c.num_layers == 2);
  CHECK(c.num_kv_heads == 2);
  CHECK(c.head_dim == 8);
  CHECK(c.tie_word_embeddings);
  CHECK((*ckpt)->weight_dtype() == dtype::bf16);
  // Every value came from the generator: 2 layers x 2 norms + the final norm are 1-D.
  CHECK(norms == (2 * 2 + 1) * 32);
  CHECK(static_cast<size_t>(norms + weights) * 2 == (*ckpt)->weight_bytes());
  auto norm = (*ckpt)->get(tensor_names::final_norm());
  REQUIRE(norm.view != nullptr);
  CHECK(norm.view->shape == std::vector<int64_t>{32});
}

TEST_CASE("a random Llama spec that is not a valid config is refused before anything is written",
          "[gpu][checkpoint]") {
  temp_dir dir;
  auto spec = small_spec();
  spec.num_kv_heads = 3;  // 4 heads are not a multiple of 3 kv heads
  auto err = write_random_llama(dir.path.string(), spec, [](bool) { return 0.0f; });
  CHECK(triplane::code_of(err) == triplane::errc::invalid_argument);
  CHECK_FALSE(std::filesystem::exists(dir.path / "model.safetensors"));
}
