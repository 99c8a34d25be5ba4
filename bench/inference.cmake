# Inference benchmarks (included from bench/CMakeLists.txt).
add_executable(bench_inference_cpu ${CMAKE_CURRENT_LIST_DIR}/inference_cpu_bench.cpp)
target_link_libraries(bench_inference_cpu PRIVATE triplane::gpu Threads::Threads)
target_compile_definitions(bench_inference_cpu PRIVATE TRIPLANE_FIXTURES_DIR="${TRIPLANE_FIXTURES_DIR}")
