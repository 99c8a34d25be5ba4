# The record under which a virtual actor's state is stored (storage/, column family
# "triplane.state"): the kind's own payload plus what storage needs to version, fence and verify it.
#
# Compatibility rule for every schema in this folder (records outlive builds):
# - ordinals are never reused or renumbered, fields are never removed, retyped or renamed in a way
#   that changes their meaning; new fields are only added, with the next ordinal, and must read
#   sensibly as their default (zero/empty) in records written before they existed;
# - a change that cannot follow this rule bumps formatVersion; readers refuse records whose
#   formatVersion is higher than the one they know (errc::corrupted naming the key), and keep
#   reading every older one.
@0x9f33fc4ab85392ac;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("triplane::schemas");

struct StateRecord {
  formatVersion @0 :UInt16;
  # Layout version of this record itself; 1 is the only one so far.

  schemaVersion @1 :UInt32;
  # The actor kind's payload schema version at write time (the kind decides how to upgrade).

  version @2 :UInt64;
  # State version: 1 for the first write of the key, +1 for each later one.

  epoch @3 :UInt64;
  # Activation epoch of the writer (see state_store::begin_activation).

  payload @4 :Data;
  # The kind's bytes, usually a Cap'n Proto message of the kind's own schema.

  payloadCrc32c @5 :UInt32;
  # CRC-32C (Castagnoli) of payload. RocksDB checksums its blocks, but not a value on its way
  # through memtable, WAL replay and caches, nor bytes a tool or bug put there; this covers them.
}
