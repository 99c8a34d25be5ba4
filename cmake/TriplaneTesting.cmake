# triplane_add_test(NAME SOURCES ... [LIBS ...] [LABELS ...])
# One Catch2 executable per call; each TEST_CASE becomes its own ctest entry.
include(Catch)

function(triplane_add_test name)
  cmake_parse_arguments(arg "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${arg_SOURCES})
  target_link_libraries(${name} PRIVATE Catch2::Catch2WithMain ${arg_LIBS})
  set(_props "")
  if(arg_LABELS)
    set(_props PROPERTIES LABELS "${arg_LABELS}")
  endif()
  catch_discover_tests(${name}
    TEST_PREFIX "${name}: "
    ${_props}
    DISCOVERY_TIMEOUT 30)
endfunction()
