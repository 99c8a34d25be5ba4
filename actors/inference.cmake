# triplane::inference_serving: the inference worker actor (continuous batching, streaming,
# cancellation, admission control, supervision) over the gpu layer's engine. Sources and tests live
# under src/inference/; included from actors/CMakeLists.txt.
file(GLOB inference_serving_sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/src/inference/*.cpp)
list(FILTER inference_serving_sources EXCLUDE REGEX "_test\\.cpp$")
add_library(triplane_inference_serving ${inference_serving_sources})
add_library(triplane::inference_serving ALIAS triplane_inference_serving)
target_include_directories(triplane_inference_serving
  PUBLIC ${CMAKE_CURRENT_LIST_DIR}/include
  PRIVATE ${CMAKE_CURRENT_LIST_DIR}/src/inference)
target_link_libraries(triplane_inference_serving
  PUBLIC triplane::gpu triplane::runtime CAF::core spdlog::spdlog
  PRIVATE Threads::Threads)

if(TRIPLANE_BUILD_TESTS)
  file(GLOB inference_serving_tests CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/src/inference/*_test.cpp)
  foreach(test_source IN LISTS inference_serving_tests)
    get_filename_component(test_name ${test_source} NAME_WE)
    triplane_add_test(inference_${test_name} SOURCES ${test_source}
      LIBS triplane::inference_serving triplane::gpu
      LABELS inference)
    target_include_directories(inference_${test_name} PRIVATE ${CMAKE_CURRENT_LIST_DIR}/src/inference)
    target_compile_definitions(inference_${test_name} PRIVATE
      TRIPLANE_FIXTURES_DIR="${TRIPLANE_FIXTURES_DIR}"
      TRIPLANE_GENERATE_EXE="$<TARGET_FILE:triplane-generate>")
    add_dependencies(inference_${test_name} triplane-generate)
  endforeach()
endif()

# The serving benchmark (source in bench/, like every benchmark; declared here so that
# bench/CMakeLists.txt needs no change).
if(TRIPLANE_BUILD_BENCH)
  add_executable(bench_inference_serving ${PROJECT_SOURCE_DIR}/bench/inference_serving_bench.cpp)
  target_include_directories(bench_inference_serving PRIVATE ${PROJECT_SOURCE_DIR}/bench)
  target_link_libraries(bench_inference_serving PRIVATE triplane::inference_serving CAF::core)
  target_compile_definitions(bench_inference_serving PRIVATE TRIPLANE_FIXTURES_DIR="${TRIPLANE_FIXTURES_DIR}")
endif()
