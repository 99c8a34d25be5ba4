# Test-only (storage/src/state_store_test.cpp): a kind's payload schema as first released.
@0xa1a948a64f5f54f5;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("triplane::schemas::test::v1");

struct Counter {
  count @0 :UInt64;
  owner @1 :Text;
}
