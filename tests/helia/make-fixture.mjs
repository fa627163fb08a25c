#!/usr/bin/env node
// Build test fixtures with the JS stack, to check the harness scripts against known-good input.
//
//   node make-fixture.mjs car --in FILE --out CAR [--name blockchain.json]
//     UnixFS-adds FILE in an offline in-memory Helia, wraps it in a directory under NAME and
//     writes every block to a CARv1 rooted at the directory (root block first). Prints
//     {"ok":true,"root":DIR_CID,"file_cid":...,"file_sha256":HEX,"file_bytes":N,"blocks":N,"ms":T}
//
//   node make-fixture.mjs ipns --value /ipfs/CID --out FILE [--seq N] [--lifetime-ms MS] [--v1-compatible]
//     Signs an IPNS record with a fresh Ed25519 key (V2-only unless --v1-compatible, which also
//     adds the legacy V1 fields) and writes it marshalled. Prints
//     {"ok":true,"name":"k51...","peer_id":"12D3KooW...","value":...,"sequence":N,"ms":T}
import { createHash } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { args, collect, main, usageError } from './common.mjs'
import { unixfs } from '@helia/unixfs'
import { CarWriter } from '@ipld/car'
import * as dagPb from '@ipld/dag-pb'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { createHeliaLight } from 'helia'
import { createIPNSRecord, marshalIPNSRecord } from 'ipns'
import { base36 } from 'multiformats/bases/base36'

const [command] = process.argv.splice(2, 1)
const { values: opt } = args({
  in: { type: 'string' },
  out: { type: 'string' },
  name: { type: 'string', default: 'blockchain.json' },
  value: { type: 'string' },
  seq: { type: 'string', default: '1' },
  'lifetime-ms': { type: 'string', default: String(24 * 3600 * 1000) },
  'v1-compatible': { type: 'boolean', default: false }
}, { usage: 'make-fixture.mjs car --in FILE --out CAR | ipns --value V --out FILE' })
if (!opt.out) usageError('--out is required')

async function car () {
  if (!opt.in) usageError('car needs --in FILE')
  const data = await readFile(opt.in)
  const helia = createHeliaLight() // never started: no libp2p, no brokers, only its memory blockstore
  const fs = unixfs(helia)
  // the file at NAME inside a directory: ROOT/NAME
  let root, fileCid
  for await (const entry of fs.addAll([{ path: opt.name, content: data }], { wrapWithDirectory: true })) {
    if (entry.path === opt.name) fileCid = entry.cid
    else root = entry.cid
  }
  const { writer, out } = CarWriter.create([root])
  const written = collect(out)
  // the blockstore is keyed by multihash (getAll yields raw CIDs): walk the DAG from the root instead
  let blocks = 0
  const queue = [root]
  while (queue.length > 0) {
    const cid = queue.shift()
    const bytes = await collect(helia.blockstore.get(cid))
    await writer.put({ cid, bytes })
    blocks++
    if (cid.code === dagPb.code) queue.push(...dagPb.decode(bytes).Links.map(link => link.Hash))
  }
  await writer.close()
  await writeFile(opt.out, await written)
  return { root: root.toString(), file_cid: fileCid.toString(), file_sha256: createHash('sha256').update(data).digest('hex'), file_bytes: data.byteLength, blocks }
}

async function ipns () {
  if (!opt.value) usageError('ipns needs --value /ipfs/CID')
  const key = await generateKeyPair('Ed25519')
  const record = await createIPNSRecord(key, opt.value, BigInt(opt.seq), Number(opt['lifetime-ms']), { v1Compatible: opt['v1-compatible'] })
  await writeFile(opt.out, marshalIPNSRecord(record))
  return {
    name: key.publicKey.toCID().toString(base36),
    peer_id: key.publicKey.toString(),
    value: record.value,
    sequence: record.sequence,
    v1_compatible: opt['v1-compatible']
  }
}

const commands = { car, ipns }
if (!(command in commands)) usageError(`unknown command ${command ?? '(none)'}: use car or ipns`)
await main(commands[command])
