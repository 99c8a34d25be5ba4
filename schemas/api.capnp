# Triplane's client API: object-capability style. A client reaches nothing but what the bootstrap
# interface hands out after authentication; every object a tenant can name hangs off its Tenant.
#
# COMPATIBILITY RULE (read before editing):
#   - Ordinals (@N) are never reused and never renumbered, in structs, interfaces, enums, unions.
#   - A field or method is never removed: it is deprecated by a comment and the server keeps
#     answering it (methods may answer `unavailable`).
#   - New fields get the next free ordinal; their default must mean "the old behaviour".
#   - Types of existing fields never change; renaming is allowed (names are not on the wire), but
#     clients generated from text (pycapnp) use names, so do not rename either.
#   - Bump `Bootstrap.protocolVersion` only when the meaning of an existing call changes.
#
# ERRORS: a failed call is answered with a Cap'n Proto exception whose description contains
#   "triplane:<code>: <message>"
# where <code> is one of the snake_case names listed in ErrorCode below (e.g. "not_found",
# "permission_denied", "limit_exceeded", "overloaded", "timeout", "invalid_argument", "internal").
# Any client, in any language, reads the exception description (pycapnp: `str(exc)` or
# `exc.description`), finds "triplane:", and takes the text up to the next ':' as the code.
# The kj exception type is also set: OVERLOADED for overloaded and limit_exceeded,
# DISCONNECTED for unavailable, FAILED otherwise. An exception without "triplane:" came from the
# RPC layer itself (e.g. a malformed message or a lost connection).
@0xb7b550509df7137f;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("triplane::api");

enum ErrorCode {
  # The codes of the "triplane:<code>:" prefix, for reference; same numbering as triplane::errc.
  ok @0;
  notFound @1;          # not_found
  alreadyExists @2;     # already_exists
  permissionDenied @3;  # permission_denied
  invalidArgument @4;   # invalid_argument
  limitExceeded @5;     # limit_exceeded
  timeout @6;           # timeout
  overloaded @7;        # overloaded
  corrupted @8;         # corrupted
  staleEpoch @9;        # stale_epoch
  ioError @10;          # io_error
  unavailable @11;      # unavailable
  internal @12;         # internal
  cancelled @13;        # cancelled
}

enum Role {
  tenant @0;
  admin @1;
}

interface Bootstrap {
  # The capability a new connection gets. Failed authentications are slowed down and, after
  # repeated failures, the connection is closed.
  authenticate @0 (token :Text) -> (tenant :Tenant, name :Text, role :Role);
  protocolVersion @1 () -> (version :UInt32);
}

interface Tenant {
  session @0 (id :Text, create :Bool) -> (session :Session);
  # Opens the session `id` of this tenant. create=false: not_found unless it exists (has stored
  # state: it was created with create=true, or written to, and not destroyed since).
  # create=true: creates it (with default settings, stored at once) when absent. Ids are 1..200 bytes of printable characters; the same id
  # used by two tenants names two different sessions.
  # A tenant holds at most the node's limit of stored sessions (100,000 by default): creating
  # one more (here, or with Session.fork) is limit_exceeded until one is destroyed.
  inference @1 () -> (inference :Inference);
  admin @2 () -> (admin :Admin);
  # permission_denied unless the token's role is admin.
  listSessions @3 (prefix :Text, after :Text, limit :UInt32) -> (ids :List(Text), more :Bool);
  # One page of this tenant's stored sessions (those session(id, create=false) opens), by the
  # ids the tenant gave them, in byte order: the ids that begin with `prefix` (empty: all) and
  # sort after `after` (empty: from the first). At most `limit` ids (0 = 1000; a larger value is
  # cut to 1000); `more` is true when further ids follow: ask again with `after` = the last id.
  # Read from storage: no session is activated. prefix and after are at most 200 printable
  # bytes (as ids), else invalid_argument.
}

# ---------------------------------------------------------------------------------------------
# Sessions (execution plane)

enum OutputStream {
  stdout @0;
  stderr @1;
}

interface OutputSink {
  # Provided by the client; the server pushes command output into it as it is produced.
  write @0 (stream :OutputStream, chunk :Data) -> stream;
  done @1 () -> ();
  # Called once after the last write, before exec returns: when exec's result arrives, every
  # write has been handled by the sink (streaming calls run one at a time, in order).
}

struct EnvVar {
  name @0 :Text;
  value @1 :Text;
}

struct ExecRequest {
  argv @0 :List(Text);     # program and arguments; or
  shell @1 :Text;          # a shell command line (used when argv is empty)
  stdin @2 :Data;
  env @3 :List(EnvVar);    # overrides on top of the session's environment
  cwd @4 :Text;            # relative to the workspace root; empty = session's working directory
  timeoutMs @5 :UInt32;    # 0 = the server's default (60 s); more than the server's maximum
                           # (10 minutes by default) is cut to that maximum
  outputCapBytes @6 :UInt64;
  # Bytes of output kept (and streamed) per stream; the rest is read and dropped and the result
  # says truncated. 0 = the node's default (1 MiB); more than the server's maximum (64 MiB by
  # default) is invalid_argument.
}

struct ExecResult {
  exitCode @0 :Int32;      # -1 when killed by a signal
  signal @1 :Int32;        # 0 unless killed by a signal
  stdout @2 :Data;         # only when exec was called without a sink
  stderr @3 :Data;         # only when exec was called without a sink
  truncated @4 :Bool;      # output exceeded the session's cap
  durationUs @5 :UInt64;
  cpuUs @6 :UInt64;
  peakMemoryBytes @7 :UInt64;
}

struct FileEntry {
  path @0 :Text;
  size @1 :UInt64;
  mode @2 :UInt32;         # POSIX mode bits, including the file type
}

struct SessionInfo {
  id @0 :Text;             # the id as the tenant named it
  createdUnixMs @1 :UInt64;
  lastUsedUnixMs @2 :UInt64;
  fileCount @3 :UInt64;
  kvCount @4 :UInt64;
  execCount @5 :UInt64;    # commands in the session's bounded history (the newest are kept)
}

interface Session {
  exec @0 (request :ExecRequest, sink :OutputSink) -> (result :ExecResult);
  # Runs a command. With a sink, output is streamed to it as it comes (flow-controlled) and the
  # result carries no output; without one, the output comes in the result. Cancelling the call or
  # disconnecting kills the command. Commands run in the session's sandbox (bubblewrap, no
  # network); one session runs one command at a time, later ones wait.
  readFile @1 (path :Text, offset :UInt64, length :UInt64) -> (data :Data);
  # length 0 = to the end. A read larger than one message carries (64 MiB by default) is
  # limit_exceeded: read it in ranges.
  writeFile @2 (path :Text, data :Data, makeParents :Bool, executable :Bool) -> ();
  listFiles @3 (path :Text, recursive :Bool, after :Text, limit :UInt32)
      -> (entries :List(FileEntry), more :Bool);
  # Entries in byte order of their paths, those after `after` only (empty: from the first).
  # limit 0: the whole listing, or limit_exceeded when it is larger than one message carries
  # (64 MiB by default). limit > 0: a page of at most `limit` entries (fewer when a message
  # could not carry them); `more` says whether entries follow: ask again with `after` = the last
  # path. Pages see the workspace as it is when each is asked for.
  removeFile @4 (path :Text, recursive :Bool) -> ();
  kvGet @5 (key :Text) -> (found :Bool, value :Data);
  kvPut @6 (key :Text, value :Data) -> ();
  kvDelete @7 (key :Text) -> (existed :Bool);
  kvList @8 (prefix :Text) -> (keys :List(Text));
  fork @9 (newId :Text) -> (session :Session);
  # A new session of the same tenant with a copy of this one's state.
  destroy @10 () -> ();
  # Removes the session and everything only it references. Every Session capability of the id
  # (any connection) is stale from then on: its calls answer notFound, and a new session under
  # the id starts only with Tenant.session(id, create=true). While the destroy runs, the id's
  # other capabilities answer unavailable.
  info @11 () -> (info :SessionInfo);
}

# ---------------------------------------------------------------------------------------------
# Inference (inference plane)

interface TokenSink {
  tokens @0 (ids :List(UInt32), text :Text) -> stream;
  # Token ids in generation order, as the worker produces them (several per call when the
  # client is slower than the worker). `text` is empty: the node has no detokenizer.
  done @1 () -> ();
  # Called once after the last tokens, before generate returns.
}

struct GenerateRequest {
  model @0 :Text;          # empty = the node's model; else must equal ModelInfo.name (not_found)
  prompt @1 :Text;
  # Prompt text. The node has no tokenizer: a request with a non-empty `prompt` and no
  # `promptTokens` is invalid_argument. Tokenize on the client.
  maxTokens @2 :UInt32;    # new tokens to generate, >= 1; 0 = 16
  temperature @3 :Float32; # <= 0: greedy (argmax)
  topP @4 :Float32;        # 0 or 1: off
  seed @5 :UInt64;         # the same request with the same seed yields the same tokens
  promptTokens @6 :List(UInt32);  # the prompt as token ids, each < the model's vocabulary size
  topK @7 :UInt32;         # 0: off
  stopTokens @8 :List(UInt32);
  # Generation ends after one of these (it is streamed and counted); at most 1024.
}

struct GenerateResult {
  text @0 :Text;           # always empty: the node has no detokenizer (see `tokens`)
  promptTokens @1 :UInt32;
  generatedTokens @2 :UInt32;
  finishReason @3 :Text;   # "length", "stop", "cancelled"
  durationUs @4 :UInt64;
  tokens @5 :List(UInt32); # the generated token ids, only when generate was called without a sink
  timeToFirstTokenUs @6 :Int64;  # -1 when no token was generated
}

struct ModelInfo {
  name @0 :Text;
  parameters @1 :UInt64;   # weights of the model (embeddings, layers, head), approximate
  contextLength @2 :UInt32;
  backend @3 :Text;        # "cpu" | "cuda"
  vocabSize @4 :UInt32;
}

interface Inference {
  generate @0 (request :GenerateRequest, sink :TokenSink) -> (result :GenerateResult);
  # Errors: unavailable when the node serves no model (or its worker is restarting),
  # invalid_argument for a bad request, overloaded when the worker's queue or KV pool is full.
  # Cancelling the call or disconnecting cancels the generation on the worker.
  listModels @1 () -> (models :List(ModelInfo));
}

# ---------------------------------------------------------------------------------------------
# Operators

struct NodeStats {
  liveActors @0 :UInt64;
  passivatedTotal @1 :UInt64;
  activationsTotal @2 :UInt64;
  failuresTotal @3 :UInt64;
  openConnections @4 :UInt64;
  draining @5 :Bool;
}

struct MethodMetrics {
  method @0 :Text;         # "Session.kvGet", ...
  calls @1 :UInt64;
  errors @2 :UInt64;
  p50Us @3 :UInt64;
  p90Us @4 :UInt64;
  p99Us @5 :UInt64;
  maxUs @6 :UInt64;
}

struct ErrorCount {
  code @0 :Text;           # snake_case code, as in exception descriptions
  count @1 :UInt64;
}

struct RpcMetrics {
  methods @0 :List(MethodMetrics);
  errors @1 :List(ErrorCount);
  openConnections @2 :UInt64;
  connectionsTotal @3 :UInt64;
  authFailures @4 :UInt64;
}

struct InferenceStats {
  # The node's inference worker: load as of its last engine step, counters since it (re)started.
  running @0 :Int64;             # requests in the batch
  queued @1 :Int64;              # accepted, waiting to join the batch
  tokensGenerated @2 :UInt64;
  promptTokensProcessed @3 :UInt64;
  steps @4 :UInt64;              # engine forward steps
  requestsAccepted @5 :UInt64;
  requestsRejected @6 :UInt64;   # answered overloaded
  requestsCompleted @7 :UInt64;  # finished by length or stop
  requestsCancelled @8 :UInt64;  # cancelled call, or its client disconnected
  requestsFailed @9 :UInt64;
  preemptions @10 :UInt64;
  kvBlocksFree @11 :Int64;
  kvBlocksTotal @12 :Int64;
}

interface Admin {
  nodeStats @0 () -> (stats :NodeStats);
  supervisionTree @1 () -> (text :Text);
  drain @2 (deadlineMs :UInt32) -> (cancelled :UInt32);
  # Stops accepting new calls (they get `unavailable`), waits for in-flight calls up to the
  # deadline, then cancels the rest; answers how many were cancelled.
  rpcMetrics @3 () -> (metrics :RpcMetrics);
  inferenceStats @4 () -> (stats :InferenceStats);
  # unavailable when the node serves no model (or its worker is restarting).
}
