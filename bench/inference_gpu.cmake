# The CUDA inference benchmark (include from bench/CMakeLists.txt). Built only with the CUDA backend;
# without a GPU at run time it prints "no GPU: skipped" and exits 0.
if(TRIPLANE_HAVE_CUDA)
  add_executable(bench_inference_gpu ${CMAKE_CURRENT_LIST_DIR}/inference_gpu_bench.cpp)
  target_link_libraries(bench_inference_gpu PRIVATE triplane::gpu Threads::Threads)
endif()
