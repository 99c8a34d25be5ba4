# Test-only: evolution_v1.capnp grown by the compatibility rule of schemas/state.capnp
# (same struct, fields only appended with new ordinals, defaults for records written by v1).
@0xf1a12ce485a16446;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("triplane::schemas::test::v2");

struct Counter {
  count @0 :UInt64;
  owner @1 :Text;
  step @2 :UInt32 = 1;
  labels @3 :List(Text);
  limits :group {
    ceiling @4 :UInt64 = 1000;
  }
}
