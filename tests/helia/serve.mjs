#!/usr/bin/env node
// A second, independent IPFS peer for the tests: serves the bytes of --in over bitswap.
//
//   node serve.mjs --in FILE [--name blockchain.json] [--port 0] [--host 127.0.0.1]
//
// Adds FILE as a UnixFS file and wraps it in a directory under --name, then prints one line
//   {"ok":true,"multiaddr":"/ip4/127.0.0.1/tcp/P/p2p/12D3KooW...","cid":FILE_CID,"root":DIR_CID,"bytes":N}
// and serves until stdin closes or it gets SIGTERM/SIGINT (then exits 0).
// Without --in it serves nothing (a peer that has no CID) and prints cid/root as null.
import { readFile } from 'node:fs/promises'
import { args, main } from './common.mjs'
import { createNode } from './node.mjs'
import { unixfs } from '@helia/unixfs'

const { values: opt } = args({
  in: { type: 'string' },
  name: { type: 'string', default: 'blockchain.json' },
  port: { type: 'string', default: '0' },
  host: { type: 'string', default: '127.0.0.1' }
}, { usage: 'serve.mjs [--in FILE] [--name NAME] [--port P] [--host IP]' })

let helia
const shutdown = () => {
  const stop = helia ? Promise.race([helia.stop(), new Promise(resolve => setTimeout(resolve, 1000))]) : Promise.resolve()
  stop.finally(() => process.exit(0))
}
process.on('SIGTERM', shutdown).on('SIGINT', shutdown)

await main(async () => {
  helia = await createNode({ listen: [`/ip4/${opt.host}/tcp/${Number(opt.port)}`] })
  let cid = null; let root = null; let bytes = 0
  if (opt.in) {
    const data = await readFile(opt.in)
    const fs = unixfs(helia)
    cid = await fs.addBytes(data)
    root = await fs.cp(cid, await fs.addDirectory(), opt.name)
    bytes = data.byteLength
  }
  const [ma] = helia.libp2p.getMultiaddrs()
  return { multiaddr: ma.toString(), peer_id: helia.libp2p.peerId.toString(), cid: cid?.toString() ?? null, root: root?.toString() ?? null, bytes }
}, { stay: true })
process.stdin.on('end', shutdown).on('close', shutdown).resume()
