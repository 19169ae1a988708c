#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that holds each HTTP GET request for a while
before passing it on: a store that is far away (latency per request), with
responses and uploads at full speed. For measuring read-ahead on a local
gateway (scripts/bench-cold-read.sh). With COUNT_FILE, it also keeps in
that file the bytes it has passed from the store to its clients (the
responses, headers included), for scripts/bench-boot-storm.sh.

Usage: latency_proxy.py LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_SECONDS [COUNT_FILE]
Only the Python standard library is used.
"""

import asyncio
import os
import sys


received = 0


def count(n, path):
    global received
    received += n
    with open(path + ".tmp", "w") as f:
        f.write(f"{received}\n")
    os.replace(path + ".tmp", path)


async def pipe(reader, writer, delay, count_file=None):
    try:
        while data := await reader.read(1 << 20):
            if delay and data.startswith(b"GET "):
                await asyncio.sleep(delay)
            if count_file:
                count(len(data), count_file)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(port, host, target, delay, count_file):
    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection(host, target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            pipe(client_r, up_w, delay), pipe(up_r, client_w, 0, count_file)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    count_file = sys.argv[5] if len(sys.argv) == 6 else None
    if count_file:
        count(0, count_file)
    asyncio.run(
        main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), count_file)
    )
