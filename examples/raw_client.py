"""Query a dllm worker with nothing but py-libp2p and msgpack (no dllm_p2p import).

    python examples/raw_client.py /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... "Hello there"

Shows the whole wire protocol (docs/PROTOCOL.md): dial with Noise + yamux, open a
`/dllm/generate/1.0.0` stream, write one uvarint-length-prefixed msgpack map, read frames.
"""

import sys

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE, Transport as Noise


def frame(message: dict) -> bytes:
    body = msgpack.packb(message)
    n, prefix = len(body), bytearray()
    while True:  # unsigned LEB128 varint
        prefix.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(prefix) + body


async def read_some(stream) -> bytes:
    try:
        return await stream.read(65536)
    except EOFError:  # py-libp2p signals the end of a stream with StreamEOF
        return b""


async def read_frames(stream):
    buffer = b""
    while True:
        length = shift = used = 0
        while True:  # decode the varint, reading more when the buffer runs dry
            if used == len(buffer):
                chunk = await read_some(stream)
                if not chunk:
                    return
                buffer += chunk
            byte = buffer[used]
            used += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        while len(buffer) < used + length:  # read(n) may return fewer bytes than asked
            chunk = await read_some(stream)
            if not chunk:
                raise EOFError("stream ended inside a frame")
            buffer += chunk
        yield msgpack.unpackb(buffer[used : used + length])
        buffer = buffer[used + length :]


async def main(addr: str, prompt: str) -> None:
    key_pair = create_new_key_pair()
    noise = Noise(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(key_pair=key_pair, sec_opt={NOISE: noise})
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [TProtocol("/dllm/generate/1.0.0")])
        await stream.write(frame({"prompt": prompt, "max_new_tokens": 32, "stream": True}))
        await stream.close_write()
        async for message in read_frames(stream):
            if message["type"] == "token":
                print(message["text"], end="", flush=True)
            else:
                print("\n", message)
                break
        await stream.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    trio.run(main, sys.argv[1], sys.argv[2])
