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

triplane_add_test(rpc_cli_test
  SOURCES ${rpc_tests_dir}/rpc_cli_test.cpp ${rpc_tests_dir}/support/rpc_test_node_process.cpp
  LIBS triplane::rpc
  LABELS rpc)
target_include_directories(rpc_cli_test PRIVATE ${rpc_tests_dir})
target_compile_definitions(rpc_cli_test PRIVATE
  TRIPLANE_RPC_TEST_NODE="$<TARGET_FILE:triplane_rpc_test_node>"
  TRIPLANE_CLI="$<TARGET_FILE:triplane-cli>"
  TRIPLANE_EXAMPLE_CLIENT="$<TARGET_FILE:example_rpc_client>")
add_dependencies(rpc_cli_test triplane_rpc_test_node triplane-cli example_rpc_client)

# The Python example (pycapnp from PyPI, installed into a venv under the build dir) against a
# live node. Skips (exit 77) with a message when the venv or pip cannot be set up.
add_test(NAME "rpc_python_client_test: a Python pycapnp client works against a live node"
  COMMAND bash ${rpc_tests_dir}/rpc_python_client_test.sh
    $<TARGET_FILE:triplane_rpc_test_node> $<TARGET_FILE:triplane-cli>
    ${PROJECT_SOURCE_DIR}/examples/python/triplane_client.py ${PROJECT_SOURCE_DIR}/schemas/api.capnp
    ${PROJECT_BINARY_DIR}/rpc-python-venv)
set_tests_properties("rpc_python_client_test: a Python pycapnp client works against a live node"
  PROPERTIES SKIP_RETURN_CODE 77 LABELS rpc TIMEOUT 300)
