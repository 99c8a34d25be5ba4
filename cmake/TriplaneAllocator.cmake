# The allocator of the server programs: jemalloc (Debian's libjemalloc-dev) where found.
#
# Why: measured with rpc_bench (kvGet at 256 in flight, 2026-11-28), the RPC server's event-loop
# thread spent about a third of its time in glibc malloc/free: Cap'n Proto and kj allocate per
# call, and replies are built on CAF threads and freed on the kj thread, which glibc's arenas
# handle poorly. Preloading jemalloc cut CPU per call from 57-67 us to 39-48 us. RocksDB's own
# guidance also recommends jemalloc for fragmentation. Tests and the other benchmarks keep glibc
# (bench_runtime measures heap per actor with glibc's mallinfo2).
#
# -DTRIPLANE_JEMALLOC=OFF links the system allocator instead.
option(TRIPLANE_JEMALLOC "link the triplane server and the RPC benchmark with jemalloc" ON)
add_library(triplane_allocator INTERFACE)
if(TRIPLANE_JEMALLOC)
  find_library(JEMALLOC_LIBRARY NAMES jemalloc)
  if(JEMALLOC_LIBRARY)
    target_link_libraries(triplane_allocator INTERFACE ${JEMALLOC_LIBRARY})
    message(STATUS "triplane: server allocator jemalloc (${JEMALLOC_LIBRARY})")
  else()
    message(STATUS "triplane: jemalloc not found (libjemalloc-dev): the server uses glibc malloc")
  endif()
endif()
