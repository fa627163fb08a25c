#!/usr/bin/env node
// Verify a CAR file offline and optionally extract one UnixFS file from its blocks only.
//
//   node car-verify.mjs FILE [--root CID] [--path NAME]
//
// Checks that every block hashes to its CID (sha2-256; dag-pb or raw; CIDv0 or CIDv1), that the
// header roots are exactly [--root] when given (compared as CIDv1, so Qm... equals bafy...), and
// with --path exports ROOT/NAME (ROOT = --root, else the first header root) from the CAR's blocks.
// Prints {"ok":true,"roots":[...],"blocks":N,"file_cid":...,"file_sha256":HEX,"file_bytes":N,"ms":T}
// (the file_* fields only with --path).
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { args, main, usageError } from './common.mjs'
import { CarReader } from '@ipld/car'
import { exporter } from 'ipfs-unixfs-exporter'
import { CID } from 'multiformats/cid'
import { equals } from 'multiformats/bytes'
import { sha256 } from 'multiformats/hashes/sha2'

const CODECS = { 0x70: 'dag-pb', 0x55: 'raw' }

const { values: opt, positionals } = args({
  root: { type: 'string' },
  path: { type: 'string' }
}, { positionals: 1, usage: 'car-verify.mjs FILE [--root CID] [--path NAME]' })
if (positionals.length !== 1) usageError('one CAR file is required')

await main(async () => {
  const reader = await CarReader.fromBytes(await readFile(positionals[0]))
  const roots = await reader.getRoots()
  const blocks = new Map() // CIDv1 string -> bytes
  let count = 0
  for await (const { cid, bytes } of reader.blocks()) {
    if (!(cid.code in CODECS)) throw new Error(`block ${cid}: unsupported codec 0x${cid.code.toString(16)}`)
    if (cid.multihash.code !== sha256.code) throw new Error(`block ${cid}: unsupported hash 0x${cid.multihash.code.toString(16)}`)
    if (!equals((await sha256.digest(bytes)).digest, cid.multihash.digest)) throw new Error(`block ${cid}: bytes do not hash to its CID`)
    blocks.set(cid.toV1().toString(), bytes)
    count++
  }
  if (opt.root) {
    const want = CID.parse(opt.root).toV1()
    if (roots.length !== 1 || !roots[0].toV1().equals(want)) throw new Error(`header roots [${roots.join(', ')}] are not [${opt.root}]`)
  }
  const result = { roots: roots.map(String), blocks: count }
  if (opt.path != null) {
    const root = opt.root ? CID.parse(opt.root) : roots[0]
    if (!root) throw new Error('the CAR has no root and no --root was given')
    const blockstore = {
      async * get (cid) {
        const bytes = blocks.get(cid.toV1().toString())
        if (!bytes) throw new Error(`block ${cid} (under ${root}/${opt.path}) is not in the CAR`)
        yield bytes
      }
    }
    const entry = await exporter(`${root}/${opt.path}`, blockstore)
    if (entry.type !== 'file' && entry.type !== 'raw') throw new Error(`${root}/${opt.path} is a ${entry.type}, not a file`)
    const hash = createHash('sha256')
    let size = 0
    for await (const chunk of entry.content()) { hash.update(chunk); size += chunk.byteLength }
    Object.assign(result, { file_cid: entry.cid.toString(), file_sha256: hash.digest('hex'), file_bytes: size })
  }
  return result
})
