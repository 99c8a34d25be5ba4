#!/usr/bin/env python3
"""A Triplane client in Python with pycapnp (pip install pycapnp): proof that any Cap'n Proto
implementation can talk to a node. It loads schemas/api.capnp at run time.

    TRIPLANE_ENDPOINT=127.0.0.1:7400 TRIPLANE_TOKEN=... python3 triplane_client.py [SCHEMA]

Errors arrive as capnp.KjException whose description holds "triplane:<code>: <message>".
Exits 0 when every step behaved as expected, 1 otherwise.
"""
import asyncio
import os
import sys

import capnp

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "schemas", "api.capnp")
# "/capnp/c++.capnp" (imported by the schema) ships with pycapnp, and with libcapnp-dev.
IMPORTS = [os.path.dirname(os.path.dirname(capnp.__file__)), "/usr/include", "/usr/local/include"]
api = capnp.load(SCHEMA, imports=[p for p in IMPORTS if os.path.isdir(p)])


def error_code(exc):
    """The triplane error code of a failed call ("not_found", ...), or None."""
    text = str(exc)
    at = text.find("triplane:")
    if at < 0:
        return None
    return text[at + len("triplane:"):].split(":", 1)[0]


class PrintingSink(api.OutputSink.Server):
    """Receives exec output while the command runs."""

    def __init__(self):
        self.chunks = []

    async def write(self, stream, chunk, **kwargs):
        self.chunks.append((str(stream), bytes(chunk)))
        print(f"[{stream}] {bytes(chunk).decode(errors='replace')}", end="", flush=True)

    async def done(self, **kwargs):
        pass  # exec calls this after the last write, before it returns


async def main():
    endpoint = os.environ.get("TRIPLANE_ENDPOINT", "127.0.0.1:7400")
    token = os.environ.get("TRIPLANE_TOKEN")
    if not token:
        print("set TRIPLANE_TOKEN", file=sys.stderr)
        return 2
    host, port = endpoint.rsplit(":", 1)
    stream = await capnp.AsyncIoStream.create_connection(host=host, port=int(port))
    client = capnp.TwoPartyClient(stream)
    bootstrap = client.bootstrap().cast_as(api.Bootstrap)

    auth = await bootstrap.authenticate(token)
    print(f"authenticated as tenant {auth.name} ({auth.role})")
    tenant = auth.tenant

    session = (await tenant.session("py-example", True)).session
    await session.kvPut("language", b"python")
    got = await session.kvGet("language")
    assert got.found and bytes(got.value) == b"python", got
    print("kv language =", bytes(got.value).decode())

    await session.writeFile("hello.txt", b"hi from pycapnp\n", True, False)
    data = (await session.readFile("hello.txt", 0, 0)).data
    assert bytes(data) == b"hi from pycapnp\n", data

    sink = PrintingSink()
    result = (await session.exec(request={"argv": ["echo", "hello", "from", "python"]},
                                 sink=sink)).result
    assert result.exitCode == 0, result
    assert b"".join(c for _, c in sink.chunks) == b"hello from python\n", sink.chunks

    # Typed errors: a session that does not exist.
    try:
        await tenant.session("no-such-session", False)
        print("expected not_found", file=sys.stderr)
        return 1
    except capnp.KjException as exc:
        code = error_code(exc)
        print("opening a missing session:", code)
        if code != "not_found":
            return 1
    # A tenant token does not reach Admin.
    try:
        await (await tenant.admin()).admin.nodeStats()
        print("tenant reached Admin", file=sys.stderr)
        return 1
    except capnp.KjException as exc:
        code = error_code(exc)
        print("admin as tenant:", code)
        if code != "permission_denied":
            return 1
    print("python client: OK")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(capnp.run(main())))
