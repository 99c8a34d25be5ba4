# A sandbox session's persistent record (actors/, column family "sandbox.sessions", key = session
# id): its settings, environment, working directory, kv memory, bounded history, and the manifest
# of its workspace. File contents are not here: each file lists the SHA-256 names of its chunks,
# stored once per node in "sandbox.chunks" and reference counted in "sandbox.refs".
# Same compatibility rule as state.capnp: append fields with the next ordinal, never reuse.
@0xec3172ed5ee5e938;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("triplane::schemas");

struct SessionRecord {
  formatVersion @0 :UInt16;     # 1; 2 when a file entry is a hard link (hardLinkOf): a build
                                # that does not know links refuses the record instead of
                                # materializing those names as empty files
  id @1 :Text;
  createdUnixMs @2 :UInt64;
  lastUsedUnixMs @3 :UInt64;
  forkedFrom @4 :Text;
  cwd @5 :Text;
  env @6 :List(KeyValue);
  kv @7 :List(KeyValue);
  history @8 :List(Command);
  settings @9 :Settings;
  files @10 :List(FileEntry);   # sorted by path
  nextBgId @11 :UInt64;

  struct KeyValue {
    key @0 :Text;
    value @1 :Data;
  }

  struct Command {
    argv @0 :List(Text);
    exited @1 :Bool;
    exitCode @2 :Int32;
    termSignal @3 :Int32;
    timedOut @4 :Bool;
    durationUs @5 :UInt64;
    startedUnixMs @6 :UInt64;
  }

  struct Settings {
    memoryBytes @0 :UInt64;
    maxProcesses @1 :UInt32;
    cpuTimeMs @2 :UInt64;
    maxFileBytes @3 :UInt64;
    stdoutCapBytes @4 :UInt64;
    stderrCapBytes @5 :UInt64;
    defaultTimeoutMs @6 :UInt64;
    workspaceQuotaBytes @7 :UInt64;
    maxKvBytes @8 :UInt64;
    maxTarBytes @9 :UInt64;
    network @10 :UInt8;         # actors::network_policy
    owner @11 :Text;
  }

  struct FileEntry {
    path @0 :Text;              # workspace-relative
    kind @1 :UInt8;             # actors::file_type: 0 regular, 1 directory, 2 symlink
    mode @2 :UInt32;            # permission bits
    size @3 :UInt64;
    mtimeNs @4 :Int64;
    chunks @5 :List(Data);      # 32-byte SHA-256 per chunk, in file order (regular files)
    linkTarget @6 :Text;        # symlinks
    hardLinkOf @7 :Text;        # regular files: the path of the entry this one is a hard link of
                                # (which holds the chunks: this entry has none); empty otherwise
  }
}
