# RPC benchmark (issue 4): the real node in-process (directory, sandbox sessions, inference
# worker) behind the real RPC server. Included by bench/CMakeLists.txt.
include_guard(GLOBAL)

add_executable(rpc_bench ${PROJECT_SOURCE_DIR}/bench/rpc_bench.cpp)
# rpc/src for coalescing_stream.hpp: the "batched" client rows use the server's own transport.
target_include_directories(rpc_bench PRIVATE ${PROJECT_SOURCE_DIR}/actors/include
                                             ${PROJECT_SOURCE_DIR}/rpc/src)
target_link_libraries(rpc_bench PRIVATE triplane::rpc triplane_rpc_api triplane::runtime
  triplane::storage triplane::gpu triplane::actors triplane::inference_serving CAF::core
  spdlog::spdlog triplane_allocator)  # the server's allocator, as in the triplane program
target_compile_definitions(rpc_bench PRIVATE TRIPLANE_FIXTURES_DIR="${TRIPLANE_FIXTURES_DIR}")
set_target_properties(rpc_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bench)
