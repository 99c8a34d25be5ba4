# Sandbox sessions through the real virtual-actor directory (issue 3). Included from tests/CMakeLists.txt.
triplane_add_test(session_directory_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/session_directory_test.cpp
  LIBS triplane::actors triplane::runtime triplane::storage CAF::core LABELS sandbox)
target_include_directories(session_directory_test PRIVATE ${CMAKE_CURRENT_LIST_DIR}/support)
