# RPC benchmark (issue 4). Included by rpc/CMakeLists.txt; guarded so that bench/CMakeLists.txt
# may include it as well.
include_guard(GLOBAL)

add_executable(rpc_bench
  ${PROJECT_SOURCE_DIR}/bench/rpc_bench.cpp
  ${PROJECT_SOURCE_DIR}/tests/support/session_directory_double.cpp)
target_include_directories(rpc_bench PRIVATE ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(rpc_bench PRIVATE triplane::rpc triplane_rpc_api CAF::core spdlog::spdlog)
set_target_properties(rpc_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bench)
