# RPC end-to-end tests (issue 4) against the REAL node: each test starts `triplane serve` (the
# runtime directory, sandbox sessions under bubblewrap, RocksDB, the RPC server) as a separate
# process. Included by rpc/CMakeLists.txt; guarded so that tests/CMakeLists.txt may include it
# as well.
include_guard(GLOBAL)

set(rpc_tests_dir ${PROJECT_SOURCE_DIR}/tests)
if(NOT TRIPLANE_FIXTURES_DIR)
  set(TRIPLANE_FIXTURES_DIR ${PROJECT_SOURCE_DIR}/../shared/fixtures CACHE PATH "test fixtures")
endif()

foreach(test_name rpc_end_to_end_test rpc_bad_input_test)
  triplane_add_test(${test_name}
    SOURCES ${rpc_tests_dir}/${test_name}.cpp ${rpc_tests_dir}/support/serve_process.cpp
    LIBS triplane::client triplane::rpc triplane_rpc_api
    LABELS rpc)
  target_include_directories(${test_name} PRIVATE ${rpc_tests_dir})
  target_compile_definitions(${test_name} PRIVATE
    TRIPLANE_SERVE_EXE="$<TARGET_FILE:triplane>"
    TRIPLANE_CLI="$<TARGET_FILE:triplane-cli>"
    TRIPLANE_FIXTURES_DIR="${TRIPLANE_FIXTURES_DIR}")
  add_dependencies(${test_name} triplane triplane-cli)
endforeach()

triplane_add_test(rpc_cli_test
  SOURCES ${rpc_tests_dir}/rpc_cli_test.cpp ${rpc_tests_dir}/support/serve_process.cpp
  LIBS triplane::rpc
  LABELS rpc)
target_include_directories(rpc_cli_test PRIVATE ${rpc_tests_dir})
target_compile_definitions(rpc_cli_test PRIVATE
  TRIPLANE_SERVE_EXE="$<TARGET_FILE:triplane>"
  TRIPLANE_FIXTURES_DIR="${TRIPLANE_FIXTURES_DIR}"
  TRIPLANE_CLI="$<TARGET_FILE:triplane-cli>"
  TRIPLANE_EXAMPLE_CLIENT="$<TARGET_FILE:example_rpc_client>")
add_dependencies(rpc_cli_test triplane triplane-cli example_rpc_client)

# The Python example (pycapnp from PyPI, installed into a venv under the build dir) against a
# live node. Skips (exit 77) with a message when the venv or pip cannot be set up.
add_test(NAME "rpc_python_client_test: a Python pycapnp client works against a live node"
  COMMAND bash ${rpc_tests_dir}/rpc_python_client_test.sh
    $<TARGET_FILE:triplane> $<TARGET_FILE:triplane-cli>
    ${PROJECT_SOURCE_DIR}/examples/python/triplane_client.py ${PROJECT_SOURCE_DIR}/schemas/api.capnp
    ${PROJECT_BINARY_DIR}/rpc-python-venv)
set_tests_properties("rpc_python_client_test: a Python pycapnp client works against a live node"
  PROPERTIES SKIP_RETURN_CODE 77 LABELS rpc TIMEOUT 300)
