# Sandbox sessions benchmark (issue 3). Included from bench/CMakeLists.txt.
add_executable(sandbox_bench ${CMAKE_CURRENT_LIST_DIR}/sandbox_bench.cpp)
target_include_directories(sandbox_bench PRIVATE ${PROJECT_SOURCE_DIR}/actors/src)
target_link_libraries(sandbox_bench PRIVATE triplane::actors triplane::storage)
