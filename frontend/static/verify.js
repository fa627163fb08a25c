// dllm-p2p web page: check a registry (blockchain.json, format dllm-registry/1) in the
// browser before any of its records is used, and remember which gateways answer.
//
// verifyChain(doc) checks what dllm_p2p/registry/chain.py verify_chain checks (docs/REGISTRY.md):
// the document's shape, each block's index and prev link, each record's fields and bounds,
// peer id == its Ed25519 public key, its signature (WebCrypto Ed25519), the proof of work the
// checkpoint asks for, each peer's seq growing, and each block's own sha256 hash. It says
// {ok, error, firstBad}: the first bad block and why, as "block N: reason".
//
// Loaded before app.js; app.js only calls window.dllmVerify. No framework, no build step.
"use strict";

(() => {
  const FORMAT = "dllm-registry/1";
  const RECORD_DOMAIN = "dllm-registry-record/1\n";
  const POW_DOMAIN = "dllm-pow/1\n";
  const ZERO_HASH = "0".repeat(64);
  const OPS = ["register", "renew", "deregister"];
  const ROLES = ["worker", "gateway", "relay"];
  const MAX_BLOCKS = 5000;
  const MAX_RECORD_BYTES = 2048;
  const MAX_ADDRS = 16;
  const MAX_MODELS = 32;
  const MAX_ADDR_CHARS = 256;
  const MAX_MODEL_CHARS = 128;
  const MAX_PEER_ID_CHARS = 128;
  const MAX_KEY_CHARS = 1024;
  const MAX_SIGNATURE_CHARS = 1024;
  const MAX_URL_CHARS = 512;
  const MAX_INT = Number.MAX_SAFE_INTEGER;  // 2^53 - 1, as in chain.py
  const MAX_CLOCK_SKEW = 300;
  const MAX_ISSUED_SKEW = 3600;
  const MAX_RECORD_TTL = 86400;
  const MAX_POW_BITS = 32;
  const MAX_POW_CHARS = 32;
  const MAX_FINGERPRINT_CHARS = 80;
  const MAX_LAYERS = 10000;
  const REQUIRED = ["op", "peer_id", "public_key", "addrs", "models", "seq", "issued", "expires", "signature"];
  const OPTIONAL = ["role", "gateway_url", "pow", "spans"];
  const HEX64 = /^[0-9a-f]{64}$/;
  const PRINTABLE = /^[\x20-\x7e]+$/;
  const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
  const ascii = new TextEncoder();  // every byte hashed or signed is ASCII, so UTF-8 is ASCII

  /** Why a block (or the document) is refused; verifyChain turns it into a result. */
  class Bad extends Error {}

  // --- the canonical encoding (chain.py canonical) ----------------------------------------

  const escapeNonAscii = (text) => text.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
  const own = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);
  const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
  const isInt = (value) => typeof value === "number" && Number.isInteger(value) && value >= 0 && value <= MAX_INT;

  /** Python's json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True):
   *  keys sorted, no whitespace, integers in decimal, everything past U+007E escaped as
   *  \uXXXX (lowercase hex, UTF-16 units: what Python writes). Throws on a number that is not
   *  an integer (the format has none, and their spelling differs between the two languages). */
  function canonical(value) {
    if (value === null) return "null";
    if (value === true) return "true";
    if (value === false) return "false";
    if (typeof value === "number") {
      if (!Number.isSafeInteger(value)) throw new Bad("a number that is not an integer the format allows");
      return String(value);
    }
    if (typeof value === "string") return escapeNonAscii(JSON.stringify(value));
    if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
    if (typeof value === "object") {
      const keys = Object.keys(value).sort();
      return `{${keys.map((k) => `${escapeNonAscii(JSON.stringify(k))}:${canonical(value[k])}`).join(",")}}`;
    }
    throw new Bad(`${typeof value} is not JSON`);
  }

  const without = (obj, name) => Object.fromEntries(Object.entries(obj).filter(([k]) => k !== name));

  /** What a record's signature covers (chain.py signing_bytes). */
  const signingBytes = (record) => ascii.encode(RECORD_DOMAIN + canonical(without(record, "signature")));

  const hex = (buffer) => [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");

  function subtle() {
    const s = globalThis.crypto && globalThis.crypto.subtle;
    if (!s) throw new Untrusted("this browser offers no WebCrypto here (it needs a secure context: https, localhost or a file), so it cannot check the registry's signatures", null);
    return s;
  }

  const sha256 = async (bytes) => new Uint8Array(await subtle().digest("SHA-256", bytes));

  /** sha256 (lowercase hex) of the canonical encoding of a block without its hash (chain.py block_hash). */
  const blockHash = async (block) => hex(await sha256(ascii.encode(canonical(without(block, "hash")))));

  // --- keys, peer ids, proof of work -----------------------------------------------------

  /** Standard base64 in its one canonical spelling (chain.py _decode_b64): the bytes, or
   *  "invalid" (not base64) or "noncanonical" (base64, but not as Python would write it). */
  function decodeB64(text) {
    if (typeof text !== "string" || text.length % 4 || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) return "invalid";
    let binary;
    try { binary = atob(text); } catch { return "invalid"; }
    if (!binary || btoa(binary) !== text) return "noncanonical";
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  }

  function decodeField(name, text) {
    const bytes = decodeB64(text);
    if (bytes === "invalid") throw new Bad(`${name} is not valid base64`);
    if (bytes === "noncanonical") throw new Bad(`${name} is not canonical base64`);
    return bytes;
  }

  function base58(bytes) {
    const digits = [];  // the value in base 58, least significant digit first
    for (const byte of bytes) {
      let carry = byte;
      for (let i = 0; i < digits.length; i++) {
        carry += digits[i] * 256;
        digits[i] = carry % 58;
        carry = Math.floor(carry / 58);
      }
      while (carry) { digits.push(carry % 58); carry = Math.floor(carry / 58); }
    }
    let zeros = 0;
    while (zeros < bytes.length && bytes[zeros] === 0) zeros++;  // each leading zero byte is a "1"
    return "1".repeat(zeros) + digits.reverse().map((d) => B58[d]).join("");
  }

  /** The 32 raw key bytes of a libp2p Ed25519 public key protobuf (PublicKey{Type: 1, Data:
   *  32 bytes}: 08 01 12 20 ...), or null for any other key or encoding. */
  function ed25519Key(protobuf) {
    if (!protobuf || protobuf.length !== 36) return null;
    if (protobuf[0] !== 0x08 || protobuf[1] !== 0x01 || protobuf[2] !== 0x12 || protobuf[3] !== 0x20) return null;
    return protobuf.slice(4);
  }

  /** The base58btc peer id of a protobuf-encoded public key: the identity multihash of the
   *  bytes (00, length, bytes), as libp2p does for keys of at most 42 bytes. */
  function peerIdFromPublicKey(protobuf) {
    if (typeof protobuf === "string") protobuf = decodeB64(protobuf);
    if (!(protobuf instanceof Uint8Array) || !ed25519Key(protobuf)) return null;
    return base58(Uint8Array.of(0x00, protobuf.length, ...protobuf));
  }

  /** Whether sha256(POW_DOMAIN + peer id + "\n" + nonce) starts with ``bits`` zero bits (chain.py pow_ok). */
  async function powOk(peerId, nonce, bits) {
    if (bits <= 0) return true;
    if (typeof nonce !== "string" || !nonce || nonce.length > MAX_POW_CHARS) return false;
    const digest = await sha256(ascii.encode(`${POW_DOMAIN}${peerId}\n${nonce}`));
    for (let bit = 0; bit < bits; bit++) {
      if (digest[bit >> 3] & (0x80 >> (bit & 7))) return false;
    }
    return true;
  }

  async function signatureOk(key32, signature, data) {
    const s = subtle();
    let key;
    try {
      key = await s.importKey("raw", key32, { name: "Ed25519" }, false, ["verify"]);
    } catch (err) {
      if (err && err.name === "NotSupportedError") {
        throw new Untrusted("this browser cannot check Ed25519 signatures (WebCrypto without Ed25519)", null);
      }
      return false;  // not a valid point: no signature verifies with it
    }
    try {
      return await s.verify({ name: "Ed25519" }, key, signature, data);
    } catch {
      return false;
    }
  }

  // --- shape checks (chain.py _check_shape, _check_link, _check_checkpoint) --------------

  const show = (value) => {
    const text = typeof value === "string" ? `'${value}'` : JSON.stringify(value);
    return text.length <= 40 ? text : `${text.slice(0, 37)}...`;
  };

  function checkFields(obj, required, optional) {
    for (const key of required) if (!own(obj, key)) return `missing field '${key}'`;
    for (const key of Object.keys(obj)) {
      if (!required.includes(key) && !optional.includes(key)) return `unknown field ${show(key)}`;
    }
    return null;
  }

  function checkStr(name, value, maxChars) {
    if (typeof value !== "string") throw new Bad(`${name} must be a string`);
    if (!value || value.length > maxChars) throw new Bad(`${name} must be 1 to ${maxChars} characters`);
    if (!PRINTABLE.test(value)) throw new Bad(`${name} must be printable ASCII`);
    return value;
  }

  function checkInt(name, value) {
    if (!isInt(value)) throw new Bad(`${name} must be an integer from 0 to 2^53-1`);
    return value;
  }

  function checkList(name, value, maxItems, maxChars) {
    if (!Array.isArray(value)) throw new Bad(`${name} must be a list`);
    if (value.length > maxItems) throw new Bad(`${name} has ${value.length} entries, more than ${maxItems}`);
    for (const item of value) checkStr(`${name} entry`, item, maxChars);
    return value;
  }

  function checkSpans(spans, models) {
    if (!isObject(spans) || !Object.keys(spans).length || Object.keys(spans).length > MAX_MODELS) {
      throw new Bad(`spans must be a map of 1 to ${MAX_MODELS} models`);
    }
    for (const [name, facts] of Object.entries(spans)) {
      if (!models.includes(name)) throw new Bad(`spans names ${show(name)}, which is not in models`);
      if (!isObject(facts) || checkFields(facts, ["fingerprint", "span", "layers"], [])) {
        throw new Bad("each spans entry must be {fingerprint, span, layers}");
      }
      checkStr("spans fingerprint", facts.fingerprint, MAX_FINGERPRINT_CHARS);
      const { layers, span } = facts;
      if (!Number.isInteger(layers) || layers < 1 || layers > MAX_LAYERS) {
        throw new Bad(`spans layers must be a whole number from 1 to ${MAX_LAYERS}`);
      }
      if (!Array.isArray(span) || span.length !== 2 || !span.every(Number.isInteger) || !(span[0] >= 0 && span[0] < span[1] && span[1] <= layers)) {
        throw new Bad("spans span must be [start, end] with 0 <= start < end <= layers");
      }
    }
  }

  function checkShape(record) {
    if (!isObject(record)) throw new Bad("record must be a JSON object");
    const problem = checkFields(record, REQUIRED, OPTIONAL);
    if (problem) throw new Bad(problem);
    if (!OPS.includes(record.op)) throw new Bad(`unknown op ${show(record.op)}`);
    checkStr("peer_id", record.peer_id, MAX_PEER_ID_CHARS);
    checkStr("public_key", record.public_key, MAX_KEY_CHARS);
    checkStr("signature", record.signature, MAX_SIGNATURE_CHARS);
    for (const addr of checkList("addrs", record.addrs, MAX_ADDRS, MAX_ADDR_CHARS)) {
      if (!addr.startsWith("/") || addr.includes(" ")) throw new Bad(`addrs entry ${show(addr)} is not a multiaddr`);
    }
    checkList("models", record.models, MAX_MODELS, MAX_MODEL_CHARS);
    checkInt("seq", record.seq);
    const issued = checkInt("issued", record.issued);
    if (checkInt("expires", record.expires) <= issued) throw new Bad("expires must be after issued");
    if (record.expires - issued > MAX_RECORD_TTL) throw new Bad(`a record may live at most ${MAX_RECORD_TTL} s (expires - issued)`);
    const role = own(record, "role") ? record.role : "worker";
    if (!ROLES.includes(role)) throw new Bad(`unknown role ${show(role)}`);
    if (own(record, "pow")) checkStr("pow", record.pow, MAX_POW_CHARS);
    if (own(record, "spans")) checkSpans(record.spans, record.models);
    if (own(record, "gateway_url")) {
      const url = checkStr("gateway_url", record.gateway_url, MAX_URL_CHARS);
      if (!/^https?:\/\//.test(url) || url.includes(" ")) throw new Bad("gateway_url must be an http(s) URL");
      if (role !== "gateway") throw new Bad("gateway_url is only allowed with role 'gateway'");
    }
    if (canonical(record).length > MAX_RECORD_BYTES) throw new Bad(`record is larger than ${MAX_RECORD_BYTES} bytes`);
  }

  /** A record on its own, then its proof of work (chain.py validate_record, _check_record). */
  async function checkRecord(record, powBits, now) {
    checkShape(record);
    if (record.issued > now + MAX_ISSUED_SKEW) {
      throw new Bad(`issued in the future (${record.issued}, more than ${MAX_ISSUED_SKEW} s ahead)`);
    }
    const publicKey = decodeField("public_key", record.public_key);
    const signature = decodeField("signature", record.signature);
    const key32 = ed25519Key(publicKey);
    if (!key32) throw new Bad("public_key is not a libp2p Ed25519 public key (the only kind this page checks)");
    if (peerIdFromPublicKey(publicKey) !== record.peer_id) throw new Bad("peer id does not match the public key");
    if (!(await signatureOk(key32, signature, signingBytes(record)))) throw new Bad("bad signature");
    if (!(await powOk(record.peer_id, record.pow, powBits))) {
      throw new Bad(`no proof of work of ${powBits} bits for this peer id ('pow')`);
    }
  }

  function checkLink(block, index, prev, payload) {
    if (!isObject(block)) throw new Bad("block must be a JSON object");
    if (index === 0 && own(block, "record")) throw new Bad("the first block must be a checkpoint");
    if (index > 0 && own(block, "checkpoint")) throw new Bad("only the first block may be a checkpoint");
    const problem = checkFields(block, ["index", "prev", payload, "hash"], []);
    if (problem) throw new Bad(problem);
    if (!Number.isInteger(block.index)) throw new Bad("index must be an integer");
    if (block.index !== index) throw new Bad(`out of order: index ${block.index} at position ${index}`);
    for (const name of ["prev", "hash"]) {
      if (typeof block[name] !== "string" || !HEX64.test(block[name])) throw new Bad(`${name} must be 64 lowercase hex digits`);
    }
    if (block.prev !== prev) {
      throw new Bad(index === 0 ? "the first block's prev must be 64 zeros" : `broken link: prev is not the hash of block ${index - 1}`);
    }
  }

  async function checkHash(block) {
    if ((await blockHash(block)) !== block.hash) throw new Bad("hash mismatch: the block does not hash to its 'hash' field");
    return block.hash;
  }

  function checkCheckpoint(block, now, clamp) {
    checkLink(block, 0, ZERO_HASH, "checkpoint");
    const checkpoint = block.checkpoint;
    if (!isObject(checkpoint)) throw new Bad("checkpoint must be a JSON object");
    const problem = checkFields(checkpoint, ["compacted_at"], ["pow_bits"]);
    if (problem) throw new Bad(`checkpoint: ${problem}`);
    if (!isInt(checkpoint.compacted_at)) throw new Bad("compacted_at must be an integer from 0 to 2^53-1");
    if (checkpoint.compacted_at > now + MAX_CLOCK_SKEW && !clamp) throw new Bad(`checkpoint is in the future (compacted_at ${checkpoint.compacted_at})`);
    const powBits = own(checkpoint, "pow_bits") ? checkpoint.pow_bits : 0;
    if (own(checkpoint, "pow_bits") && !(Number.isInteger(powBits) && powBits >= 1 && powBits <= MAX_POW_BITS)) {
      throw new Bad(`pow_bits must be an integer from 1 to ${MAX_POW_BITS} (absent for 0)`);
    }
    return powBits;
  }

  // --- the chain ------------------------------------------------------------------------

  /** A registry the page must not use, and why. */
  class Untrusted extends Error {
    constructor(reason, firstBad) {
      super(reason);
      this.name = "RegistryUntrusted";
      this.firstBad = firstBad;
    }
  }

  /** Verify a blockchain.json (parsed, or its text) as chain.py verify_chain does. Resolves to
   *  {ok: true, error: null, firstBad: null, blocks, head, powBits} or {ok: false, error:
   *  "block N: reason" (just the reason for the document as a whole), firstBad: N or null}.
   *  ``now`` (unix seconds, default the clock) bounds records' issued, and with ``clamp: false``
   *  the checkpoint stamp too. By default (``clamp``, as a node takes a peer's chain) a stamp
   *  ahead of the clock is not refused: the page merges nothing, so the unsigned stamp cannot
   *  change what it trusts, and a browser whose clock is slow still takes an honest registry.
   *  Never throws for a bad chain; throws Untrusted when the browser cannot check at all. */
  async function verifyChain(doc, { now = Date.now() / 1000, clamp = true } = {}) {
    const fail = (firstBad, reason) => ({ ok: false, error: firstBad === null ? reason : `block ${firstBad}: ${reason}`, firstBad });
    if (typeof doc === "string") {
      try { doc = JSON.parse(doc); } catch (err) { return fail(null, `not valid JSON: ${err.message}`); }
    }
    if (!isObject(doc)) return fail(null, "the document must be a JSON object");
    const problem = checkFields(doc, ["format", "blocks"], []);
    if (problem) return fail(null, problem);
    if (doc.format !== FORMAT) return fail(null, `unsupported format ${show(doc.format)}, expected '${FORMAT}'`);
    const blocks = doc.blocks;
    if (!Array.isArray(blocks)) return fail(null, "blocks must be a list");
    if (!blocks.length) return fail(null, "no blocks: a chain starts with a checkpoint block");
    if (blocks.length > MAX_BLOCKS) return fail(null, `${blocks.length} blocks is more than ${MAX_BLOCKS}`);

    let powBits;
    let prev;
    const lastSeq = new Map();  // peer id -> [block index, seq]
    for (let index = 0; index < blocks.length; index++) {
      const block = blocks[index];
      try {
        if (index === 0) {
          powBits = checkCheckpoint(block, now, clamp);
        } else {
          checkLink(block, index, prev, "record");
          const record = block.record;
          await checkRecord(record, powBits, now);
          const seen = lastSeq.get(record.peer_id);
          if (seen && record.seq <= seen[1]) {
            throw new Bad(`seq ${record.seq} does not grow: block ${seen[0]} of the same peer has seq ${seen[1]}`);
          }
          lastSeq.set(record.peer_id, [index, record.seq]);
        }
        prev = await checkHash(block);
      } catch (err) {
        if (err instanceof Bad) return fail(index, err.message);
        throw err;
      }
    }
    return { ok: true, error: null, firstBad: null, blocks: blocks.length, head: prev, powBits };
  }

  /** ``doc`` once verifyChain accepts it; otherwise throws Untrusted naming the first bad block. */
  async function trusted(doc, options) {
    let result;
    try {
      result = await verifyChain(doc, options);
    } catch (err) {
      api.last = { ok: false, error: err.message, firstBad: null };
      if (err instanceof Untrusted) throw err;
      throw new Untrusted(`the registry could not be checked (${err.message})`, null);
    }
    api.last = result;
    if (!result.ok) {
      const where = result.firstBad === null ? "" : ` at block ${result.firstBad}`;
      const reason = result.firstBad === null ? result.error : result.error.replace(/^block \d+: /, "");
      throw new Untrusted(`the registry fails verification${where} (${reason})`, result.firstBad);
    }
    return doc;
  }

  /** Put an Untrusted error on the discovery status line, as its own element
   *  (data-testid="registry-untrusted"); other errors are left as app.js showed them. */
  function showUntrusted(status, err) {
    if (!(err instanceof Untrusted)) return;
    const span = document.createElement("span");
    span.dataset.testid = "registry-untrusted";
    span.textContent = `Not trusted: ${err.message}. None of its gateways is used.`;
    status.replaceChildren(span);
    status.classList.add("bad");
  }

  // --- which gateways answer: counts per URL in localStorage -----------------------------

  const HISTORY_KEY = "dllm.gatewayHistory";
  const MAX_GATEWAYS = 32;  // URLs remembered; the least recently seen is forgotten first
  const MAX_COUNT = 1000;   // past it both counts are halved: recent behaviour weighs more

  function loadHistory() {
    let raw;
    try { raw = JSON.parse(localStorage.getItem(HISTORY_KEY) || "{}"); } catch { raw = {}; }
    const history = new Map();
    if (!isObject(raw)) return history;
    for (const [url, entry] of Object.entries(raw)) {
      if (isObject(entry) && isInt(entry.ok) && isInt(entry.fail) && isInt(entry.t) && url.length <= MAX_URL_CHARS) {
        history.set(url, { ok: entry.ok, fail: entry.fail, t: entry.t });
      }
    }
    return history;
  }

  function saveHistory(history) {
    const entries = [...history.entries()].sort((a, b) => b[1].t - a[1].t).slice(0, MAX_GATEWAYS);
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(Object.fromEntries(entries)));
    } catch { /* storage disabled or full: the history just isn't remembered */ }
  }

  /** Count one answer (ok) or failure of the gateway at ``url``. */
  function recordAnswer(url, ok) {
    if (typeof url !== "string" || !url || url.length > MAX_URL_CHARS) return;
    const history = loadHistory();
    const entry = history.get(url) || { ok: 0, fail: 0, t: 0 };
    if (ok) entry.ok += 1; else entry.fail += 1;
    if (entry.ok + entry.fail > MAX_COUNT) {
      entry.ok = Math.floor(entry.ok / 2);
      entry.fail = Math.floor(entry.fail / 2);
    }
    entry.t = Date.now();
    history.set(url, entry);
    saveHistory(history);
  }

  /** {ok, fail} remembered for ``url`` (zeros when unknown). */
  function gatewayHistory(url) {
    const entry = loadHistory().get(url);
    return entry ? { ok: entry.ok, fail: entry.fail } : { ok: 0, fail: 0 };
  }

  /** Laplace's rule of succession: an unknown gateway scores 1/2, one that always answered
   *  approaches 1, one that always failed approaches 0. */
  const score = ({ ok, fail }) => (ok + 1) / (ok + fail + 2);

  /** ``urls`` best first: by score, then by answers; in random order among equals (so
   *  unknown gateways share the load). */
  function rankGateways(urls) {
    const history = loadHistory();
    const rows = [...urls].map((url) => ({ url, h: history.get(url) || { ok: 0, fail: 0 } }));
    for (let i = rows.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [rows[i], rows[j]] = [rows[j], rows[i]];
    }
    rows.sort((a, b) => score(b.h) - score(a.h) || b.h.ok - a.h.ok);
    return rows.map((row) => row.url);
  }

  const api = {
    verifyChain, trusted, showUntrusted, Untrusted,
    canonical, signingBytes, blockHash, peerIdFromPublicKey, powOk,
    recordAnswer, gatewayHistory, rankGateways,
    last: null,  // the result of the last trusted() call
  };
  window.dllmVerify = api;
})();
