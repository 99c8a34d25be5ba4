// The paged KV cache: block accounting, all-or-nothing allocation, and an exhausted pool answering
// `overloaded` while the engine stays usable.
#include <catch2/catch.hpp>

#include "test_support.hpp"
#include "triplane/gpu/generate.hpp"
#include "triplane/gpu/kv_cache.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;
using triplane::errc;

TEST_CASE("the block manager maps positions to slots through per-sequence block tables", "[kv]") {
  kv_block_manager m(4, 2);
  REQUIRE(!m.add_sequence(1));
  REQUIRE(!m.add_sequence(2));
  CHECK(triplane::code_of(m.add_sequence(1)) == errc::already_exists);
  auto p = m.plan({1, 2}, {3, 1});
  REQUIRE(p);
  CHECK(m.free_blocks() == 1);
  m.commit(*p);
  CHECK(m.length(1) == 3);
  const auto& s1 = (*p)[0];
  REQUIRE(s1.slots.size() == 3);
  CHECK(s1.slots[0] / 2 == (*s1.block_table)[0]);
  CHECK(s1.slots[2] / 2 == (*s1.block_table)[1]);
  // Needs 2 more blocks (seq 1 grows to 5 -> 3 blocks; seq 2 to 3 -> 2 blocks) but one is free.
  auto over = m.plan({1, 2}, {2, 2});
  REQUIRE(!over);
  CHECK(triplane::code_of(over.error()) == errc::overloaded);
  CHECK(m.free_blocks() == 1);
  CHECK(m.length(1) == 3);
  // Rolled-back plans return their blocks.
  auto q = m.plan({2}, {2});
  REQUIRE(q);
  CHECK(m.free_blocks() == 0);
  m.rollback(*q);
  CHECK(m.free_blocks() == 1);
  CHECK(triplane::code_of(m.plan({1, 1}, {1, 1}).error()) == errc::invalid_argument);
  CHECK(triplane::code_of(m.plan({7}, {1}).error()) == errc::not_found);
  m.free_sequence(1);
  m.free_sequence(1);
  CHECK(m.free_blocks() == 3);
}

TEST_CASE("an exhausted KV pool answers overloaded and the engine keeps serving", "[kv]") {
  // Tiny model: 3 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes = 768 bytes per token;
  // 16-token blocks are 12288 bytes: a 4-block pool holds 64 tokens.
  auto engine = make_cpu("tiny-llama-f32", 1, 4 * 12288);
  REQUIRE(engine->kv_stats().num_blocks == 4);
  const auto e = load_expected("tiny-llama-f32")[2];  // 23 tokens: 2 blocks
  REQUIRE(!engine->add_sequence(1));
  REQUIRE(!engine->add_sequence(2));
  REQUIRE(!engine->add_sequence(3));
  REQUIRE(engine->forward({{1, e.ids, false}}));
  REQUIRE(engine->forward({{2, e.ids, false}}));
  CHECK(engine->kv_stats().free_blocks == 0);
  auto full = engine->forward({{3, e.ids, false}});
  REQUIRE(!full);
  CHECK(triplane::code_of(full.error()) == errc::overloaded);
  // A step mixing a sequence that fits with one that does not changes nothing.
  auto mixed = engine->forward({{1, {5}, false}, {3, {1, 2}, false}});
  REQUIRE(!mixed);
  CHECK(triplane::code_of(mixed.error()) == errc::overloaded);
  CHECK(engine->sequence_length(1) == 23);
  CHECK(engine->sequence_length(3) == 0);
  // Freeing a sequence makes room; results are still right.
  engine->free_sequence(2);
  auto again = engine->forward({{3, e.ids, true}});
  REQUIRE(again);
  CHECK(max_abs_diff((*again)[0].values, e.logits) <= 1e-4f * value_range(e.logits));
  // Too long for the pool at all: overloaded, not a crash.
  engine->free_sequence(1);
  engine->free_sequence(3);
  generate_request req;
  req.prompt = std::vector<int32_t>(65, 7);
  req.max_new_tokens = 1;
  auto too_long = generate(*engine, req);
  REQUIRE(!too_long);
  CHECK(triplane::code_of(too_long.error()) == errc::overloaded);
  CHECK(engine->kv_stats().free_blocks == 4);
}

TEST_CASE("bad step items are refused without touching the cache", "[kv]") {
  auto engine = make_cpu("tiny-llama-f32");
  REQUIRE(!engine->add_sequence(1));
  CHECK(triplane::code_of(engine->forward({{1, {384}, false}}).error()) == errc::invalid_argument);
  CHECK(triplane::code_of(engine->forward({{1, {}, false}}).error()) == errc::invalid_argument);
  CHECK(triplane::code_of(engine->forward({{2, {1}, false}}).error()) == errc::not_found);
  CHECK(triplane::code_of(engine->forward({{1, std::vector<int32_t>(1025, 1), false}}).error()) ==
        errc::limit_exceeded);
  CHECK(engine->sequence_length(1) == 0);
  CHECK(engine->forward({{1, {1, 2}, false}}));
}

TEST_CASE("a KV budget below one block is refused at construction", "[kv]") {
  auto ckpt = checkpoint::open(fixture_dir("tiny-llama-f32"));
  REQUIRE(ckpt);
  backend_options opts;
  opts.kv_cache_bytes = 100;
  auto b = make_backend(**ckpt, opts);
  REQUIRE(!b);
  CHECK(triplane::code_of(b.error()) == errc::invalid_argument);
}

TEST_CASE("a KV budget larger than memory is refused, not a crash", "[kv]") {
  auto ckpt = checkpoint::open(fixture_dir("tiny-llama-f32"));
  REQUIRE(ckpt);
  backend_options opts;
  opts.kv_cache_bytes = int64_t{1} << 42;  // 4 TiB: under the block-count cap, beyond any RAM
  auto b = make_backend(**ckpt, opts);
  REQUIRE(!b);
  INFO(triplane::describe(b.error()));
  CHECK(triplane::code_of(b.error()) == errc::limit_exceeded);
  CHECK_THAT(triplane::describe(b.error()), Catch::Contains("not enough memory"));
}
