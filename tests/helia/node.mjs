// The networked Helia node of fetch.mjs and serve.mjs (kept out of common.mjs: loading libp2p
// costs about a second, which the offline scripts don't pay).
import './node20.mjs'
import { withBitswap } from '@helia/bitswap'
import { withLibp2pLight } from '@helia/libp2p'
import { identify } from '@libp2p/identify'
import { noise } from '@libp2p/noise'
import { tcp } from '@libp2p/tcp'
import { yamux } from '@libp2p/yamux'
import { createHeliaLight } from 'helia'

/**
 * A started Helia node with no routers, no bootstrap, no discovery and no HTTP: only libp2p over
 * TCP + Noise + yamux (identify so peers learn each other's protocols) and bitswap.
 */
export async function createNode ({ listen = [] } = {}) {
  const helia = withBitswap(withLibp2pLight(createHeliaLight(), {
    addresses: { listen },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: { identify: identify() },
    // its pings would close a connection to a peer that doesn't speak /ipfs/ping
    connectionMonitor: { enabled: false }
  }))
  await helia.start()
  return helia
}
