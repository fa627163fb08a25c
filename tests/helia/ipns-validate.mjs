#!/usr/bin/env node
// Validate a marshalled IPNS record against an IPNS name with the `ipns` package (@helia/ipns's).
//
//   node ipns-validate.mjs --name NAME --record FILE
//
// NAME: k51... (base36 CIDv1 libp2p-key), any other multibase CID of a libp2p-key, a base58
// peer id (12D3KooW... / Qm...), optionally prefixed by /ipns/. The record must carry a valid
// V2 signature over its DAG-CBOR data by the key of NAME and not be expired (ipnsValidator with
// the routing key "/ipns/" + multihash). Prints
// {"ok":true,"value":"/ipfs/...","sequence":N,"validity":"<RFC3339>","ttl_ns":N,"ms":T}
import { readFile } from 'node:fs/promises'
import { args, main, usageError } from './common.mjs'
import { multihashToIPNSRoutingKey, unmarshalIPNSRecord } from 'ipns'
import { ipnsValidator } from 'ipns/validator'
import { base36 } from 'multiformats/bases/base36'
import { base58btc } from 'multiformats/bases/base58'
import { CID } from 'multiformats/cid'
import * as Digest from 'multiformats/hashes/digest'

const LIBP2P_KEY = 0x72

const { values: opt } = args({
  name: { type: 'string' },
  record: { type: 'string' }
}, { usage: 'ipns-validate.mjs --name NAME --record FILE' })
if (!opt.name || !opt.record) usageError('--name and --record are required')

function nameMultihash (name) {
  name = name.replace(/^\/ipns\//, '')
  if (/^(12D3Koo|Qm)/.test(name)) return Digest.decode(base58btc.baseDecode(name))
  const cid = CID.parse(name, name.startsWith('k') ? base36 : undefined)
  if (cid.code !== LIBP2P_KEY) throw new Error(`${name} is not a libp2p-key CID (codec 0x${cid.code.toString(16)})`)
  return cid.multihash
}

await main(async () => {
  let digest
  try { digest = nameMultihash(opt.name) } catch (err) { throw new Error(`bad IPNS name ${opt.name}: ${err.message}`) }
  const marshalled = await readFile(opt.record)
  try {
    await ipnsValidator(multihashToIPNSRoutingKey(digest), marshalled)
  } catch (err) {
    throw new Error(`record ${opt.record} is not valid for ${opt.name}: ${err.name}: ${err.message}`)
  }
  const record = unmarshalIPNSRecord(marshalled)
  return { value: record.value, sequence: record.sequence, validity: record.validity, ttl_ns: record.ttl ?? null }
})
