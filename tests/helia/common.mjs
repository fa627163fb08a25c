// Shared by the harness scripts: the CLI conventions (node.mjs has the networked Helia node).
//
// Every script prints one JSON line {"ok":true,...} on success (stdout unless the script says
// otherwise) and exits 0; on failure it prints one line "<script>: <message>" on stderr and
// exits 1 (2 for bad arguments).
import './node20.mjs'
import { basename } from 'node:path'
import { parseArgs } from 'node:util'

const script = basename(process.argv[1] ?? 'helia')

/** util.parseArgs with strict options; a usage error exits 2. */
export function args (options, { positionals = 0, usage = '' } = {}) {
  try {
    const parsed = parseArgs({ options, allowPositionals: positionals > 0, strict: true })
    if (parsed.positionals.length > positionals) throw new Error(`unexpected argument ${parsed.positionals[positionals]}`)
    return parsed
  } catch (err) {
    process.stderr.write(`${script}: ${err.message}${usage ? ` (usage: ${usage})` : ''}\n`)
    process.exit(2)
  }
}

export function usageError (message) {
  process.stderr.write(`${script}: ${message}\n`)
  process.exit(2)
}

/**
 * Runs fn; writes its result as the JSON line (to `stream`) and exits 0, or reports the error and
 * exits 1. With `stay`, a success only writes the line and the process keeps running.
 */
export async function main (fn, { stream = process.stdout, stay = false } = {}) {
  const started = performance.now()
  let line, code
  try {
    const result = await fn()
    line = JSON.stringify({ ok: true, ...result, ms: Math.round(performance.now() - started) }, (_, v) => typeof v === 'bigint' ? Number(v) : v) + '\n'
    code = 0
  } catch (err) {
    const message = err?.message || err?.name || String(err)
    line = `${script}: ${message.replace(/\s+/g, ' ').trim()}\n`
    stream = process.stderr
    code = 1
  }
  // libp2p may keep timers and sockets alive: exit once the line is flushed, without waiting for them.
  stream.write(line, () => { if (code !== 0 || !stay) process.exit(code) })
}

/** Concatenates the chunks of an (async) iterable of Uint8Array. */
export async function collect (chunks) {
  const parts = []
  let length = 0
  for await (const chunk of chunks) { parts.push(chunk); length += chunk.byteLength }
  const out = new Uint8Array(length)
  let offset = 0
  for (const part of parts) { out.set(part, offset); offset += part.byteLength }
  return out
}
