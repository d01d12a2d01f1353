"""A TCP proxy that makes every request to the STS emulator take DELAY_MS longer.

tests/stacklib/stsproxy.py delays each new *connection*; the broker's AWS SDK keeps its
connection to STS alive, so after the first call that proxy adds nothing. This one delays
each request instead: the first bytes a client sends after being quiet for a while (a new
HTTP request on a kept-alive connection) wait DELAY_MS before they go upstream.

    python bench/stsdelay.py LISTEN_PORT UPSTREAM_PORT DELAY_MS
"""
import asyncio
import sys
import time

QUIET = 0.05  # seconds without client bytes that mark the next bytes as a new request


async def pipe(reader, writer, delay=0.0):
    last = 0.0
    try:
        while data := await reader.read(65536):
            now = time.monotonic()
            if delay and now - last > QUIET:
                await asyncio.sleep(delay)
            last = time.monotonic()
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(listen_port, up_port, delay):
    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", up_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w, delay), pipe(up_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print(f"sts delay proxy :{listen_port} -> :{up_port}, +{delay * 1000:.0f} ms per request", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    lp, up, ms = sys.argv[1:4]
    asyncio.run(main(int(lp), int(up), float(ms) / 1000.0))
