# RPC end-to-end tests (issue 4). Included by rpc/CMakeLists.txt; guarded so that
# tests/CMakeLists.txt may include it as well.
include_guard(GLOBAL)

set(rpc_tests_dir ${PROJECT_SOURCE_DIR}/tests)

# A node process for the tests: CAF + the session directory TEST DOUBLE + the real RPC server.
add_executable(triplane_rpc_test_node
  ${rpc_tests_dir}/rpc_test_node.cpp
  ${rpc_tests_dir}/support/session_directory_double.cpp)
target_include_directories(triplane_rpc_test_node PRIVATE ${rpc_tests_dir})
target_link_libraries(triplane_rpc_test_node PRIVATE triplane::rpc CAF::core spdlog::spdlog)

triplane_add_test(rpc_end_to_end_test
  SOURCES ${rpc_tests_dir}/rpc_end_to_end_test.cpp ${rpc_tests_dir}/support/rpc_test_node_process.cpp
  LIBS triplane::client triplane::rpc triplane_rpc_api
  LABELS rpc)
target_include_directories(rpc_end_to_end_test PRIVATE ${rpc_tests_dir})
target_compile_definitions(rpc_end_to_end_test PRIVATE
  TRIPLANE_RPC_TEST_NODE="$<TARGET_FILE:triplane_rpc_test_node>")
add_dependencies(rpc_end_to_end_test triplane_rpc_test_node)

triplane_add_test(rpc_bad_input_test
  SOURCES ${rpc_tests_dir}/rpc_bad_input_test.cpp ${rpc_tests_dir}/support/rpc_test_node_process.cpp
  LIBS triplane::client triplane::rpc triplane_rpc_api
  LABELS rpc)
target_include_directories(rpc_bad_input_test PRIVATE ${rpc_tests_dir})
target_compile_definitions(rpc_bad_input_test PRIVATE
  TRIPLANE_RPC_TEST_NODE="$<TARGET_FILE:triplane_rpc_test_node>")
add_dependencies(rpc_bad_input_test triplane_rpc_test_node)
