#!/usr/bin/env node
// Fetch a UnixFS file (or one raw block) from ONE peer over bitswap, with nothing else on the network.
//
//   node fetch.mjs --peer /ip4/127.0.0.1/tcp/P/p2p/12D3KooW... --cid CID [--path blockchain.json]
//                  [--raw-block] [--out FILE] [--timeout SECONDS]
//
// With --out the bytes go to FILE and the JSON line {"ok":true,"bytes":N,"ms":T} to stdout.
// Without --out the bytes go to stdout and the JSON line to stderr (after them, as the last line).
// Errors: one line on stderr, exit 1; a timeout says so and names the CID and the peer.
//
// The peer is dialed first and also passed to Helia as the provider of the CID. Helia's bitswap
// sends its wants only to peers whose identify response lists /ipfs/bitswap/1.2.0 (the only
// bitswap version it speaks; a new stream per message), and takes the blocks from streams that
// peer opens back. So this waits for the peer's identify and fails fast if it lacks bitswap 1.2.0.
import { createWriteStream } from 'node:fs'
import { finished } from 'node:stream/promises'
import { args, collect, main, usageError } from './common.mjs'
import { createNode } from './node.mjs'
import { unixfs } from '@helia/unixfs'
import { multiaddr } from '@multiformats/multiaddr'
import { CID } from 'multiformats/cid'

const { values: opt } = args({
  peer: { type: 'string' },
  cid: { type: 'string' },
  path: { type: 'string' },
  out: { type: 'string' },
  timeout: { type: 'string', default: '30' },
  'raw-block': { type: 'boolean', default: false }
}, { usage: 'fetch.mjs --peer MULTIADDR --cid CID [--path P] [--raw-block] [--out FILE] [--timeout S]' })
if (!opt.peer || !opt.cid) usageError('--peer and --cid are required')
if (opt['raw-block'] && opt.path) usageError('--raw-block takes no --path')
const seconds = Number(opt.timeout)
if (!(seconds > 0)) usageError(`bad --timeout ${opt.timeout}`)

const BITSWAP = '/ipfs/bitswap/1.2.0'

/** The protocols `peerId` lists in identify, once libp2p has run identify on the new connection. */
async function identified (libp2p, peerId, signal) {
  const { promise, resolve, reject } = Promise.withResolvers()
  const onIdentify = (evt) => { if (evt.detail.peerId.equals(peerId)) resolve(evt.detail.protocols) }
  const onAbort = () => reject(signal.reason)
  libp2p.addEventListener('peer:identify', onIdentify)
  signal.addEventListener('abort', onAbort)
  try {
    const known = await libp2p.peerStore.get(peerId).then(p => p.protocols, () => [])
    if (known.length > 0) resolve(known) // identify finished before we listened
    return await promise
  } finally {
    libp2p.removeEventListener('peer:identify', onIdentify)
    signal.removeEventListener('abort', onAbort)
  }
}

await main(async () => {
  const peer = multiaddr(opt.peer)
  const cid = CID.parse(opt.cid)
  const what = `${opt.cid}${opt.path ? '/' + opt.path : ''} from ${opt.peer}`
  const signal = AbortSignal.timeout(seconds * 1000)
  // a hung dial or stop must not outlive --timeout by much either
  setTimeout(() => { process.stderr.write(`fetch.mjs: timed out after ${seconds}s (hard stop): ${what}\n`); process.exit(1) }, seconds * 1000 + 3000).unref()

  const helia = await createNode()
  try {
    const out = opt.out ? createWriteStream(opt.out) : process.stdout
    let bytes = 0
    const write = async (chunk) => { bytes += chunk.byteLength; if (!out.write(chunk)) await new Promise(resolve => out.once('drain', resolve)) }
    let stage = 'dialing'
    try {
      const connection = await helia.libp2p.dial(peer, { signal })
      stage = 'waiting for its identify'
      const protocols = await identified(helia.libp2p, connection.remotePeer, signal)
      if (!protocols.includes(BITSWAP)) throw new Error(`its identify does not list ${BITSWAP}, so Helia sends it no wants (it lists: ${protocols.join(' ') || 'nothing'})`)
      stage = 'fetching'
      const options = { signal, providers: [peer] }
      if (opt['raw-block']) {
        await write(await collect(helia.blockstore.get(cid, options)))
      } else {
        for await (const chunk of unixfs(helia).cat(cid, { ...options, path: opt.path })) await write(chunk)
      }
    } catch (err) {
      if (signal.aborted) throw new Error(`timed out after ${seconds}s ${stage}: ${what}`)
      throw new Error(`fetching ${what}: ${err.message ?? err}`)
    }
    if (opt.out) { out.end(); await finished(out) }
    return { bytes }
  } finally {
    await Promise.race([helia.stop(), new Promise(resolve => setTimeout(resolve, 1000))])
  }
}, { stream: opt.out ? process.stdout : process.stderr })
