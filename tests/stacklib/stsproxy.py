"""A TCP proxy in front of the STS emulator that the tests can slow down.

The stack points the broker (and the pods) at this proxy rather than at moto itself, so a
test can add latency without touching moto: the delay, in milliseconds, is read from a
control file at every new connection. Stopping the proxy makes STS unreachable.

    python -m tests.stacklib.stsproxy LISTEN_HOST[,HOST…] LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT CONTROL_FILE
"""
import asyncio
import json
import sys


def delay_seconds(control):
    try:
        with open(control) as f:
            return max(0.0, float(json.load(f).get("delay_ms", 0)) / 1000.0)
    except (OSError, ValueError, AttributeError):
        return 0.0


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(listen_host, listen_port, up_host, up_port, control):
    async def handle(client_r, client_w):
        delay = delay_seconds(control)
        if delay:
            await asyncio.sleep(delay)
        try:
            up_r, up_w = await asyncio.open_connection(up_host, up_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    server = await asyncio.start_server(handle, listen_host.split(","), listen_port)
    print(f"sts proxy on {listen_host}:{listen_port} -> {up_host}:{up_port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    h, p, uh, up, ctl = sys.argv[1:6]
    asyncio.run(main(h, int(p), uh, int(up), ctl))
