// dllm-p2p web page: send prompts to a gateway (or chat with a chat model), watch tokens
// stream in, explore the nodes.
//
// No framework, no build step. Everything that comes from the network is put into the page
// with textContent / attributes, never as HTML.
"use strict";

(() => {
  const POLL_MS = 5000;
  const POLL_TIMEOUT_MS = 4000;
  const DISCOVER_TIMEOUT_MS = 20000;
  const MAX_LOG_ROWS = 100;
  const DEFAULT_IPFS_GATEWAY = "https://ipfs.io";
  const COPIED_MS = 2000;
  const STORE = { gateway: "dllm.gatewayUrl", registry: "dllm.registryRef", ipfs: "dllm.ipfsGateway" };

  const $ = (id) => document.getElementById(id);
  const ui = {
    health: $("health"),
    gatewayForm: $("gateway-form"),
    gatewayUrl: $("gateway-url"),
    gatewayHint: $("gateway-hint"),
    discover: $("discover"),
    discoverForm: $("discover-form"),
    registryRef: $("registry-ref"),
    ipfsGateway: $("ipfs-gateway"),
    discoverStatus: $("discover-status"),
    ask: $("ask"),
    promptTitle: $("prompt-title"),
    viewToggle: document.querySelector("[data-testid=view-toggle]"),
    viewButtons: [...document.querySelectorAll("[data-testid=view-toggle] button[data-view]")],
    completionView: $("completion-view"),
    completionOutput: $("completion-output"),
    chatView: $("chat-view"),
    chatSystem: $("chat-system"),
    chatMessages: $("chat-messages"),
    chatInput: $("chat-input"),
    chatSend: $("chat-send"),
    chatNew: $("chat-new"),
    promptForm: $("prompt-form"),
    prompt: $("prompt"),
    model: $("model"),
    modelHint: $("model-hint"),
    maxNewTokens: $("max-new-tokens"),
    temperature: $("temperature"),
    topP: $("top-p"),
    seed: $("seed"),
    stream: $("stream"),
    send: $("send"),
    stop: $("stop"),
    runStatus: $("run-status"),
    error: $("error"),
    errorMessage: $("error-message"),
    output: $("output"),
    outputMeta: $("output-meta"),
    outputRoute: $("output-route"),
    log: $("log"),
    logEmpty: $("log-empty"),
    clearLog: $("clear-log"),
    nodes: $("nodes"),
    nodesEmpty: $("nodes-empty"),
    nodesSummary: $("nodes-summary"),
    nodesError: $("nodes-error"),
    nodesUpdated: $("nodes-updated"),
    gatewayCredits: $("gateway-credits"),
    registryHead: $("registry-head"),
    registryCid: $("registry-cid"),
    registryBlocks: $("registry-blocks"),
    registryMode: $("registry-mode"),
    registryIpns: $("registry-ipns"),
    registryPublished: $("registry-published"),
    spans: $("spans"),
    spansEmpty: $("spans-empty"),
    spansSummary: $("spans-summary"),
    map: $("map"),
    nodeDetail: $("node-detail"),
    explorerSummary: $("explorer-summary"),
  };

  const fromDisk = !/^https?:$/.test(location.protocol);
  const state = {
    gateway: "",
    running: null,  // the AbortController of the answer under way, completion or chat
    pollTimer: null,
    polling: false,
    models: new Map(),  // id -> {chat: bool}, from /v1/models
    view: "completion",  // "completion" | "chat"
    viewChoice: null,  // the user's pick with the toggle; null: follow the model
    chat: { turns: [] },  // the conversation: [{role, content}], replaced by "New chat"
    chatRun: null,  // the AbortController of the chat answer under way, if any
  };

  // --- small helpers --------------------------------------------------------------------

  const storage = {
    get(key) {
      try { return localStorage.getItem(key) || ""; } catch { return ""; }
    },
    set(key, value) {
      try {
        if (value) localStorage.setItem(key, value); else localStorage.removeItem(key);
      } catch { /* storage disabled: the value just isn't remembered */ }
    },
  };

  /** Build an element; children are nodes or strings (always inserted as text). */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const dash = "–";

  // --- credits: amounts come as integer millicredits (1 credit = 1000) ---------------------

  /** A count of millicredits from the network: a number from 0 up, else null. */
  const millicredits = (v) => (isNum(v) && v >= 0 && v <= Number.MAX_SAFE_INTEGER ? v : null);

  /** What one answer cost, compactly: 3 decimals below 10 credits, fewer above. */
  function costText(mc) {
    const credits = mc / 1000;
    const decimals = credits < 10 ? 3 : credits < 1000 ? 2 : credits < 100000 ? 1 : 0;
    return credits.toFixed(decimals);
  }

  /** A ledger total, exactly (millicredits are whole, so 3 decimals lose nothing). */
  const totalText = (mc) => (mc / 1000).toFixed(3);

  /** An answer's "cost" field (untrusted): {mc, receipt} with numbers only, or null. */
  function answerCost(cost) {
    if (!cost || typeof cost !== "object" || Array.isArray(cost)) return null;
    let mc = millicredits(cost.millicredits);
    if (mc === null && millicredits(cost.credits) !== null) mc = Math.round(cost.credits * 1000);
    if (mc === null) return null;
    const receipt = Number.isSafeInteger(cost.receipt) && cost.receipt >= 0 ? cost.receipt : null;
    return { mc, receipt };
  }

  function shortId(id) {
    if (typeof id !== "string" || !id) return dash;
    return id.length > 16 ? `${id.slice(0, 6)}…${id.slice(-6)}` : id;
  }

  function shortHash(hash) {
    if (typeof hash !== "string" || !hash) return dash;
    return hash.length > 20 ? `${hash.slice(0, 10)}…${hash.slice(-8)}` : hash;
  }

  function duration(seconds) {
    if (!isNum(seconds) || seconds < 0) return dash;
    const s = Math.floor(seconds);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  const clock = (date = new Date()) => date.toLocaleTimeString([], { hour12: false });
  const capitalize = (text) => (text ? text[0].toUpperCase() + text.slice(1) : text);

  /** The hops of a route as the gateway reports it ([{peer_id, span: [start, end]}]), the
   * malformed ones dropped; null when there is no route (a whole worker answered). */
  function routeHops(route) {
    if (!Array.isArray(route)) return null;
    const hops = route.filter((h) => h && typeof h.peer_id === "string" && Array.isArray(h.span) &&
      h.span.length === 2 && h.span.every(isNum)).map((h) => ({ peer: h.peer_id, start: h.span[0], end: h.span[1] }));
    return hops.length ? hops : null;
  }

  const spanText = (start, end) => `${start}:${end}`;

  /** A route as "peer 0:10 → peer 10:20 → …", each hop titled with its full peer id. */
  function hopsView(hops, testid = "route-hop") {
    const parts = [];
    hops.forEach((hop, i) => {
      if (i) parts.push(el("span", { class: "hop-arrow", "aria-hidden": "true" }, "→"));
      parts.push(el("span", { class: "hop", title: `${hop.peer}\nlayers ${spanText(hop.start, hop.end)}`, "data-testid": testid, "data-peer-id": hop.peer },
        el("span", { class: "mono" }, shortId(hop.peer)), " ", el("span", { class: "hop-span" }, spanText(hop.start, hop.end))));
    });
    return el("span", { class: "hops" }, ...parts);
  }

  /** "http://host:port" from what the user typed; "" when it isn't an http(s) URL. */
  function normalizeHttpUrl(text) {
    let value = String(text || "").trim();
    if (!value) return "";
    if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(value)) value = `http://${value}`;
    let url;
    try { url = new URL(value); } catch { return ""; }
    if (url.protocol !== "http:" && url.protocol !== "https:") return "";
    if (url.username || url.password) return "";
    return `${url.origin}${url.pathname.replace(/\/+$/, "")}`;
  }

  /** An error the page can show as one readable line. */
  class ApiError extends Error {
    constructor(message, { status = null, code = null } = {}) {
      super(message);
      this.status = status;
      this.code = code;
    }
    get display() {
      const text = capitalize(this.message);
      const why = this.status || this.code;
      return why ? `${text} (${why})` : text;
    }
  }

  /** The gateway's error body is {"error": {"code", "message", "type"}}; tolerate others. */
  async function errorFromResponse(res) {
    let code = null;
    let message = "";
    try {
      const body = await res.json();
      const err = body && typeof body === "object" ? (body.error ?? body) : null;
      if (err && typeof err === "object") {
        if (typeof err.message === "string") message = err.message;
        if (typeof err.code === "string") code = err.code;
        if (!message && typeof err.detail === "string") message = err.detail;
      } else if (typeof err === "string") {
        message = err;
      }
    } catch { /* not JSON */ }
    if (!message) message = `${res.statusText || "HTTP error"}`.trim();
    return new ApiError(message, { status: res.status, code });
  }

  function networkError(err, base) {
    if (err && err.name === "AbortError") return err;
    if (err && err.name === "TimeoutError") return new ApiError(`the gateway at ${base} did not answer in time`);
    return new ApiError(`cannot reach the gateway at ${base} (${err && err.message ? err.message : err})`);
  }

  async function api(path, { method = "GET", body, signal, timeoutMs } = {}) {
    const base = state.gateway;
    if (!base) throw new ApiError("set the Gateway URL first");
    const signals = [signal, timeoutMs ? AbortSignal.timeout(timeoutMs) : null].filter(Boolean);
    const combined = signals.length > 1 && AbortSignal.any ? AbortSignal.any(signals) : signals[0];
    const init = { method, headers: {}, signal: combined };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(`${base}${path}`, init);
    } catch (err) {
      throw networkError(err, base);
    }
    if (!res.ok) throw await errorFromResponse(res);
    return res;
  }

  async function getJson(path) {
    const res = await api(path, { timeoutMs: POLL_TIMEOUT_MS });
    return res.json();
  }

  // --- server-sent events over fetch (EventSource can't POST) ----------------------------

  function parseEvent(raw) {
    let event = "message";
    const data = [];
    for (const line of raw.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  async function* sseEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        // Normalise line ends, keeping a trailing "\r" until we know if "\n" follows.
        const keep = buffer.endsWith("\r") ? "\r" : "";
        buffer = buffer.slice(0, buffer.length - keep.length).replace(/\r\n?/g, "\n") + keep;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event) yield event;
        }
      }
      const last = parseEvent(buffer.replace(/\r\n?/g, "\n"));
      if (last) yield last;
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function parseJson(text) {
    try { return JSON.parse(text); } catch { return null; }
  }

  // --- the gateway URL and discovery -------------------------------------------------------

  /** The gateway that served this page (its directory, in case it sits behind a path prefix). */
  const pageGateway = () => (fromDisk ? "" : normalizeHttpUrl(new URL(".", location.href).href));

  function setGateway(url, { save = true } = {}) {
    state.gateway = normalizeHttpUrl(url);
    ui.gatewayUrl.value = state.gateway;
    if (save) storage.set(STORE.gateway, state.gateway);
    if (state.gateway) ui.gatewayUrl.removeAttribute("aria-invalid");
    if (state.gateway) {
      ui.gatewayHint.textContent = fromDisk
        ? "Saved in this browser. Requests go to this gateway."
        : state.gateway === pageGateway() ? "The gateway that served this page." : "Requests go to this gateway.";
    } else {
      ui.gatewayHint.textContent = fromDisk
        ? "This page was opened from disk: enter a gateway URL, or find one through the registry below."
        : "Enter a gateway URL.";
    }
    restartPolling();
  }

  /** Where to read blockchain.json: {url, cid, names}; cid and names (the path below the
   *  CID) only for an /ipfs/ reference, the one kind that can be checked by hash. */
  function registryTarget(ref, ipfsGateway) {
    let value = String(ref || "").trim();
    if (!value) throw new ApiError("enter a registry CID or /ipns/ name");
    if (/^https?:\/\//i.test(value)) {
      const url = normalizeHttpUrl(value);
      if (!url) throw new ApiError("the registry URL is not a valid http(s) URL");
      return { url: /\.json$/i.test(url) ? url : `${url}/blockchain.json`, cid: null, names: [] };
    }
    value = value.replace(/^(ipfs|ipns):\/\//i, "/$1/");
    if (!value.startsWith("/")) value = `/ipfs/${value}`;
    const parts = value.split("/").filter(Boolean);
    if (parts.length < 2 || !/^(ipfs|ipns)$/i.test(parts[0])) {
      throw new ApiError("use a CID (Qm…, bafy…), /ipfs/<cid> or /ipns/<name>");
    }
    if (/\.json$/i.test(parts[parts.length - 1])) parts.pop();
    for (const part of parts) {
      if (!/^[A-Za-z0-9._-]+$/.test(part)) throw new ApiError(`unexpected characters in "${part}"`);
    }
    const base = normalizeHttpUrl(ipfsGateway || DEFAULT_IPFS_GATEWAY);
    if (!base) throw new ApiError("the IPFS gateway URL is not a valid http(s) URL");
    const kind = parts[0].toLowerCase();
    const url = `${base}/${kind}/${parts.slice(1).join("/")}/blockchain.json`;
    if (kind !== "ipfs") return { url, cid: null, names: [] };
    if (!/^(Qm[1-9A-HJ-NP-Za-km-z]{44}|b[a-z2-7]{58})$/.test(parts[1])) {
      throw new ApiError(`"${parts[1]}" is not a CID this page can check (Qm… or bafy…)`);
    }
    return { url, cid: parts[1], names: [...parts.slice(2), "blockchain.json"] };
  }

  /** The URL of blockchain.json for a CID, /ipfs/ path, /ipns/ name or plain URL. */
  const registryUrl = (ref, ipfsGateway) => registryTarget(ref, ipfsGateway).url;

  // --- the registry by hash: a CARv1 of dag-pb / UnixFS blocks, each checked -------------

  const MAX_CAR_BYTES = 32 * 1024 * 1024;
  const MAX_CAR_BLOCKS = 10000;
  const MAX_FILE_BYTES = 16 * 1024 * 1024;
  const DAG_PB = 0x70;
  const RAW = 0x55;
  const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
  const B32 = "abcdefghijklmnopqrstuvwxyz234567";
  const utf8 = new TextDecoder();

  /** Base58btc, the text of a CIDv0. */
  function b58(bytes) {
    let n = 0n;
    for (const b of bytes) n = n * 256n + BigInt(b);
    let out = "";
    for (; n > 0n; n /= 58n) out = B58[Number(n % 58n)] + out;
    for (let i = 0; i < bytes.length && !bytes[i]; i++) out = `1${out}`;
    return out;
  }

  /** Lowercase RFC 4648 base32 without padding, the text of a CIDv1 after its "b". */
  function b32(bytes) {
    let out = "", bits = 0, value = 0;
    for (const b of bytes) {
      value = ((value << 8) | b) & 0xffff;
      for (bits += 8; bits >= 5; bits -= 5) out += B32[(value >>> (bits - 5)) & 31];
    }
    return bits ? out + B32[(value << (5 - bits)) & 31] : out;
  }

  /** The unsigned LEB128 varint at buf[pos]: [value, position after it]. */
  function uvarint(buf, pos) {
    let value = 0;
    for (let shift = 0; shift < 63; shift += 7) {
      if (pos >= buf.length) throw new ApiError("truncated varint");
      const byte = buf[pos++];
      value += (byte & 0x7f) * 2 ** shift;
      if (!(byte & 0x80)) return [value, pos];
    }
    throw new ApiError("varint longer than 9 bytes");
  }

  /** The binary CID at buf[pos]: {cid (text), codec, digest, end}; sha2-256 only. */
  function readCid(buf, pos) {
    const start = pos;
    let version = 0, codec = DAG_PB, hash, size;
    if (buf[pos] !== 0x12 || buf[pos + 1] !== 0x20) {  // not CIDv0 (a bare sha2-256 multihash)
      [version, pos] = uvarint(buf, pos);
      [codec, pos] = uvarint(buf, pos);
      if (version !== 1 || (codec !== DAG_PB && codec !== RAW)) {
        throw new ApiError(`unsupported CID (version ${version}, codec 0x${codec.toString(16)}): only dag-pb and raw`);
      }
    }
    [hash, pos] = uvarint(buf, pos);
    [size, pos] = uvarint(buf, pos);
    if (hash !== 0x12 || size !== 32) throw new ApiError(`a CID uses hash 0x${hash.toString(16)}: only sha2-256 is accepted`);
    if (pos + 32 > buf.length) throw new ApiError("truncated CID");
    const raw = buf.subarray(start, pos + 32);
    return { cid: version ? `b${b32(raw)}` : b58(raw), codec, digest: buf.subarray(pos, pos + 32), end: pos + 32 };
  }

  /** A protobuf message as [field number, number | bytes] pairs (wire types 0 and 2). */
  function pbFields(buf, cid) {
    const out = [];
    let pos = 0, key, value, size;
    while (pos < buf.length) {
      [key, pos] = uvarint(buf, pos);
      if (key % 8 === 0) {
        [value, pos] = uvarint(buf, pos);
      } else if (key % 8 === 2 && ([size, pos] = uvarint(buf, pos)) && pos + size <= buf.length) {
        value = buf.subarray(pos, (pos += size));
      } else {
        throw new ApiError(`block ${shortHash(cid)} is not valid dag-pb`);
      }
      out.push([Math.floor(key / 8), value]);
    }
    return out;
  }

  /** Every block of a CARv1, checked against its CID: Map of CID text -> {codec, data}. */
  async function readCar(buf) {
    if (buf.length > MAX_CAR_BYTES) throw new ApiError(`the CAR is above ${MAX_CAR_BYTES >> 20} MiB`);
    const [size, start] = uvarint(buf, 0);
    const header = buf.subarray(start, start + size);
    // DAG-CBOR {roots, version: 1}: the roots are not needed, the walk starts at the CID asked for.
    if (!size || start + size > buf.length || !new TextDecoder("latin1").decode(header).includes("gversion\x01")) {
      throw new ApiError("the answer is not a CARv1");
    }
    const blocks = new Map();
    for (let pos = start + size, end; pos < buf.length; pos = end) {
      [end, pos] = uvarint(buf, pos);
      end += pos;
      if (end > buf.length || end === pos) throw new ApiError(`the CAR is cut short at byte ${pos}`);
      if (blocks.size >= MAX_CAR_BLOCKS) throw new ApiError(`the CAR holds more than ${MAX_CAR_BLOCKS} blocks`);
      const section = buf.subarray(pos, end);
      const { cid, codec, digest, end: at } = readCid(section, 0);
      const data = section.subarray(at);
      const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
      if (hash.some((b, i) => b !== digest[i])) throw new ApiError(`block ${shortHash(cid)} does not match its hash`);
      blocks.set(cid, { codec, data });
    }
    return blocks;
  }

  /** A verified block as UnixFS: {type (0 raw, 1 folder, 2 file), data, filesize, links, sizes}. */
  function unixfsNode(blocks, cid) {
    const block = blocks.get(cid);
    if (!block) throw new ApiError(`block ${shortHash(cid)} is missing from the CAR`);
    if (block.codec === RAW) return { type: 0, data: block.data, filesize: block.data.length, links: [], sizes: [] };
    const node = { type: -1, data: new Uint8Array(0), filesize: null, links: [], sizes: [] };
    let unixfs = null;
    for (const [field, value] of pbFields(block.data, cid)) {
      if (field === 1 && value instanceof Uint8Array) unixfs = value;
      if (field !== 2 || !(value instanceof Uint8Array)) continue;
      const link = { cid: null, name: "" };
      for (const [f, v] of pbFields(value, cid)) {
        if (f === 1 && v instanceof Uint8Array) {
          const target = readCid(v, 0);
          if (target.end === v.length) link.cid = target.cid;
        } else if (f === 2 && v instanceof Uint8Array) link.name = utf8.decode(v);
      }
      if (!link.cid) throw new ApiError(`block ${shortHash(cid)} has a link without a valid CID`);
      node.links.push(link);
    }
    if (!unixfs) throw new ApiError(`block ${shortHash(cid)} carries no UnixFS data`);
    for (const [field, value] of pbFields(unixfs, cid)) {
      if (field === 1 && typeof value === "number") node.type = value;
      else if (field === 2 && value instanceof Uint8Array) node.data = value;
      else if (field === 3 && typeof value === "number") node.filesize = value;
      else if (field === 4 && typeof value === "number") node.sizes.push(value);
    }
    return node;
  }

  /** The file at cid/names in a CAR, from blocks checked by hash only: {bytes, blocks used}. */
  async function carFile(car, cid, names) {
    const blocks = await readCar(car);
    let node = unixfsNode(blocks, cid);
    for (const name of names) {
      if (node.type !== 1) throw new ApiError(`${shortHash(cid)} is not a folder, so it has no ${name}`);
      const link = node.links.find((l) => l.name === name);
      if (!link) throw new ApiError(`no ${name} under ${shortHash(cid)}`);
      node = unixfsNode(blocks, (cid = link.cid));
    }
    const size = node.filesize ?? node.data.length;
    if (size > MAX_FILE_BYTES) throw new ApiError(`the file is above ${MAX_FILE_BYTES >> 20} MiB`);
    const out = new Uint8Array(size);
    let at = 0, used = 0;
    const stack = [[cid, node, size]];
    while (stack.length) {  // depth first: a node's own data, then its children in link order
      const [id, n, want] = stack.pop();
      const total = n.sizes.reduce((a, b) => a + b, n.data.length);
      if (n.type !== 0 && n.type !== 2) throw new ApiError(`block ${shortHash(id)} is not part of a file`);
      if (n.sizes.length !== n.links.length || total !== want || (n.filesize !== null && n.filesize !== want)) {
        throw new ApiError(`block ${shortHash(id)} declares sizes that do not add up`);
      }
      if (++used > MAX_CAR_BLOCKS) throw new ApiError(`the file spans more than ${MAX_CAR_BLOCKS} blocks`);
      out.set(n.data, at);
      at += n.data.length;
      for (let i = n.links.length - 1; i >= 0; i--) stack.push([n.links[i].cid, unixfsNode(blocks, n.links[i].cid), n.sizes[i]]);
    }
    return { bytes: out, blocks: names.length + used };
  }

  /** The body of a response, refusing more than max bytes. */
  async function readBounded(res, max, what) {
    if (Number(res.headers.get("content-length")) > max) throw new ApiError(`${what} is above ${max >> 20} MiB`);
    const reader = res.body.getReader();
    const chunks = [];
    for (let total = 0; ;) {
      const { value, done } = await reader.read();
      if (done) break;
      if ((total += value.length) > max) {
        reader.cancel().catch(() => {});
        throw new ApiError(`${what} is above ${max >> 20} MiB`);
      }
      chunks.push(value);
    }
    return new Uint8Array(await new Blob(chunks).arrayBuffer());
  }

  /** GET a URL for discovery; an ApiError naming it when it fails. */
  async function fetchRegistry(url, accept) {
    let res;
    try {
      res = await fetch(url, { signal: AbortSignal.timeout(DISCOVER_TIMEOUT_MS), headers: { Accept: accept } });
    } catch (err) {
      throw new ApiError(`cannot load ${url} (${err && err.message ? err.message : err})`);
    }
    if (!res.ok) throw new ApiError(`cannot load ${url}`, { status: res.status });
    return res;
  }

  /** blockchain.json and how far to trust it: by hash from a CAR for a CID, as served otherwise. */
  async function loadRegistry(target) {
    if (!target.cid) {
      const res = await fetchRegistry(target.url, "application/json");
      const what = /\/ipns\//.test(target.url) ? "an IPNS name" : "a URL";
      return { text: utf8.decode(await readBounded(res, MAX_FILE_BYTES, "the registry")), how: `not verified: ${what} is trusted as served` };
    }
    const res = await fetchRegistry(`${target.url}?format=car`, "application/vnd.ipld.car");
    const type = res.headers.get("content-type") || "";
    if (!/^application\/vnd\.ipld\.car/i.test(type)) {
      throw new ApiError(`the IPFS gateway answered ${type.split(";")[0] || "without a type"}, not a CAR: it is not a trustless gateway`);
    }
    const car = await readBounded(res, MAX_CAR_BYTES, "the CAR");
    const { bytes, blocks } = await carFile(car, target.cid, target.names);
    return { text: utf8.decode(bytes), how: `verified by hash: ${shortHash(target.cid)}, ${blocks} IPFS blocks` };
  }

  /** The records of a blockchain.json, in chain order; tolerant of the exact layout. */
  function chainRecords(doc) {
    const blocks = Array.isArray(doc) ? doc
      : Array.isArray(doc?.blocks) ? doc.blocks
      : Array.isArray(doc?.chain) ? doc.chain
      : Array.isArray(doc?.chain?.blocks) ? doc.chain.blocks
      : [];
    const records = [];
    for (const block of blocks) {
      if (!block || typeof block !== "object") continue;
      let record = block.record && typeof block.record === "object" ? block.record : block;
      if (record.body && typeof record.body === "object") record = { ...record, ...record.body };
      if (typeof record.peer_id === "string") records.push(record);
    }
    return { blocks: blocks.length, records };
  }

  /** Gateways announced in the registry that are still live: latest op per peer. */
  function liveGateways(doc, nowSeconds = Date.now() / 1000) {
    const { blocks, records } = chainRecords(doc);
    const latest = new Map();
    for (const record of records) {
      const previous = latest.get(record.peer_id);
      if (!previous || !(Number(record.seq) < Number(previous.seq))) latest.set(record.peer_id, record);
    }
    const urls = [];
    for (const record of latest.values()) {
      const op = record.op ?? record.type ?? record.action;
      if (op === "deregister") continue;
      if (record.role !== "gateway") continue;
      if (!(Number(record.expires) > nowSeconds)) continue;
      const url = normalizeHttpUrl(record.gateway_url);
      if (typeof record.gateway_url === "string" && url) urls.push(url);
    }
    return { blocks, urls: [...new Set(urls)] };
  }

  async function discover() {
    const ref = ui.registryRef.value.trim();
    const ipfs = ui.ipfsGateway.value.trim();
    storage.set(STORE.registry, ref);
    storage.set(STORE.ipfs, ipfs);
    ui.discoverStatus.textContent = "Loading the registry…";
    ui.discoverStatus.classList.remove("bad");
    delete ui.discoverStatus.dataset.verified;
    try {
      const target = registryTarget(ref, ipfs);
      const { text, how } = await loadRegistry(target);
      const doc = parseJson(text);
      if (doc === null) throw new ApiError(`the registry at ${target.url} is not JSON`);
      // No record is used before every signature and link checks out (verify.js).
      const { blocks, urls } = liveGateways(await window.dllmVerify.trusted(doc));
      if (!urls.length) {
        throw new ApiError(`the registry (${blocks} blocks; ${how}) lists no live gateway with a public URL`);
      }
      const pick = window.dllmVerify.rankGateways(urls)[0];  // gateways that answered before first
      setGateway(pick);
      ui.discoverStatus.textContent = `Found ${urls.length} live gateway${urls.length === 1 ? "" : "s"} in ${blocks} registry blocks (${how}); using ${pick}.`;
      ui.discoverStatus.dataset.verified = String(Boolean(target.cid));
    } catch (err) {
      ui.discoverStatus.textContent = err instanceof ApiError ? err.display : String(err);
      ui.discoverStatus.classList.add("bad");
      window.dllmVerify?.showUntrusted(ui.discoverStatus, err);
    }
  }

  // --- generation ------------------------------------------------------------------------

  function showError(err) {
    if (!err) {
      ui.error.hidden = true;
      ui.errorMessage.textContent = "";
      delete ui.error.dataset.code;
      delete ui.error.dataset.status;
      return;
    }
    ui.errorMessage.textContent = err instanceof ApiError ? err.display : capitalize(String(err.message || err));
    if (err.code) ui.error.dataset.code = err.code;
    if (err.status) ui.error.dataset.status = String(err.status);
    ui.error.hidden = false;
  }

  /** The sampling controls, named as the body wants the token limit named. */
  function samplingParams(maxTokensKey) {
    const body = {};
    if (ui.model.value) body.model = ui.model.value;
    const maxNew = parseInt(ui.maxNewTokens.value, 10);
    if (Number.isFinite(maxNew)) body[maxTokensKey] = maxNew;
    const temperature = parseFloat(ui.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const topP = parseFloat(ui.topP.value);
    if (Number.isFinite(topP)) body.top_p = topP;
    const seed = parseInt(ui.seed.value, 10);
    if (Number.isFinite(seed)) body.seed = seed;
    body.stream = ui.stream.checked;
    return body;
  }

  function requestBody() {
    return { prompt: ui.prompt.value, ...samplingParams("max_new_tokens") };
  }

  function setRunning(running, kind = "completion") {
    ui.send.disabled = running;
    ui.chatSend.disabled = running;
    ui.stop.disabled = !running;
    const completion = running && kind === "completion";
    const chat = running && kind === "chat";
    ui.output.setAttribute("aria-busy", completion ? "true" : "false");
    ui.output.classList.toggle("running", completion);
    ui.chatMessages.setAttribute("aria-busy", chat ? "true" : "false");
  }

  /** False (after saying so) when there is no gateway to ask. */
  function haveGateway() {
    if (state.gateway) return true;
    showError(new ApiError(fromDisk
      ? "set the Gateway URL first (this page was opened from disk)"
      : "set the Gateway URL first"));
    ui.gatewayUrl.setAttribute("aria-invalid", "true");
    ui.gatewayUrl.focus();
    return false;
  }

  /** An error reported inside a stream: {"code", "message"}. */
  function streamError(err) {
    const e = err && typeof err === "object" ? err : {};
    return new ApiError(typeof e.message === "string" && e.message ? e.message : "the node failed mid-answer",
      { code: typeof e.code === "string" ? e.code : null });
  }

  /** Fill in a log entry for a request that failed or was stopped. */
  function markFailed(entry, err, started) {
    const aborted = err && err.name === "AbortError";
    entry.latency = Math.round(performance.now() - started);
    entry.status = aborted ? "stopped" : "error";
    entry.error = aborted ? "stopped by you" : (err instanceof ApiError ? err.display : capitalize(String(err.message || err)));
    entry.code = err && err.code ? err.code : null;
    return aborted;
  }

  async function generate() {
    if (state.running) return;
    if (!haveGateway()) return;
    const body = requestBody();
    const controller = new AbortController();
    const started = performance.now();
    const entry = { time: new Date(), model: body.model || null, node: null, tokens: 0, latency: null, status: "running" };
    const row = addLogRow(entry);
    state.running = controller;
    showError(null);
    setRunning(true);
    ui.output.replaceChildren();
    ui.outputMeta.textContent = "";
    showRoute(null);
    ui.runStatus.textContent = "Waiting for a node…";
    const text = document.createTextNode("");
    ui.output.append(text);
    let firstTokenMs = null;

    const append = (piece) => {
      if (typeof piece !== "string" || !piece) return;
      if (firstTokenMs === null) {
        firstTokenMs = performance.now() - started;
        ui.runStatus.textContent = "Streaming…";
      }
      const atBottom = ui.output.scrollTop + ui.output.clientHeight >= ui.output.scrollHeight - 8;
      text.appendData(piece);
      entry.tokens += 1;
      if (atBottom) ui.output.scrollTop = ui.output.scrollHeight;
    };

    try {
      const res = await api("/api/generate", { method: "POST", body, signal: controller.signal });
      let final = null;
      if (body.stream) {
        for await (const { event, data } of sseEvents(res.body)) {
          const payload = parseJson(data);
          if (event === "token") {
            append(payload?.text);
            updateLogRow(row, { ...entry, status: "streaming" });
          } else if (event === "done") {
            final = payload || {};
            break;
          } else if (event === "error") {
            throw streamError(payload);
          }
        }
        if (!final) throw new ApiError("the answer stream ended before the final event");
      } else {
        final = await res.json();
      }
      if (typeof final.text === "string" && !text.data) text.data = final.text;
      finish(entry, final, started, firstTokenMs);
      noteAnswer(entry);
      updateLogRow(row, entry);
      ui.outputMeta.textContent = describeAnswer(final, entry);
      showRoute(entry.route);
      ui.runStatus.textContent = "Done.";
    } catch (err) {
      const aborted = markFailed(entry, err, started);
      updateLogRow(row, entry);
      ui.runStatus.textContent = aborted ? "Stopped." : "Failed.";
      if (!aborted) showError(err instanceof ApiError ? err : new ApiError(String(err.message || err)));
    } finally {
      state.running = null;
      setRunning(false);
      refresh().catch(() => {});  // the node's new latency and success rate
    }
  }

  function finish(entry, final, started, firstTokenMs) {
    const usage = final.usage && typeof final.usage === "object" ? final.usage : {};
    const timing = final.timing && typeof final.timing === "object" ? final.timing : {};
    entry.node = typeof final.node === "string" ? final.node : null;
    if (typeof final.model === "string") entry.model = final.model;
    if (isNum(usage.completion_tokens)) entry.tokens = usage.completion_tokens;
    entry.promptTokens = isNum(usage.prompt_tokens) ? usage.prompt_tokens : null;
    entry.latency = isNum(timing.total_ms) ? Math.round(timing.total_ms) : Math.round(performance.now() - started);
    entry.firstToken = isNum(timing.first_token_ms) ? Math.round(timing.first_token_ms)
      : firstTokenMs !== null ? Math.round(firstTokenMs) : null;
    entry.attempts = isNum(final.attempts) ? final.attempts : null;
    entry.finish = typeof final.finish_reason === "string" ? final.finish_reason : null;
    entry.route = routeHops(final.route);
    entry.cost = answerCost(final.cost);
    entry.status = "ok";
  }

  /** Under the answer: the spans that made it, when a route did. */
  function showRoute(hops) {
    ui.outputRoute.hidden = !hops;
    ui.outputRoute.replaceChildren(...(hops ? [
      "Route: ", hopsView(hops),
      el("span", { class: "unsigned", title: "no single worker made this answer, so none signed it" }, " · not signed"),
    ] : []));
  }

  function describeAnswer(final, entry) {
    const parts = [];
    if (entry.node) parts.push(`node ${shortId(entry.node)}`);
    if (entry.route) parts.push(`route of ${entry.route.length} span${entry.route.length === 1 ? "" : "s"}`);
    if (entry.model) parts.push(`model ${entry.model}`);
    parts.push(`${entry.tokens} token${entry.tokens === 1 ? "" : "s"}`);
    if (entry.firstToken !== null && entry.firstToken !== undefined) parts.push(`first token ${entry.firstToken} ms`);
    if (entry.latency !== null) parts.push(`total ${entry.latency} ms`);
    if (entry.finish) parts.push(`finish: ${entry.finish}`);
    if (entry.attempts && entry.attempts > 1) parts.push(`${entry.attempts} attempts`);
    if (entry.cost) parts.push(`cost ${costText(entry.cost.mc)} credits`);
    return parts.join(" · ");
  }

  // --- the chat view ---------------------------------------------------------------------

  /** Whether the selected model (or, for "any model", every live model) is a chat model. */
  function modelIsChat(id) {
    if (id) return state.models.get(id)?.chat === true;
    const all = [...state.models.values()];
    return all.length > 0 && all.every((m) => m.chat === true);
  }

  /** Show the chat or the completion view: the user's pick, else what suits the model. */
  function applyView() {
    const view = state.viewChoice || (modelIsChat(ui.model.value) ? "chat" : "completion");
    const changed = view !== state.view;
    state.view = view;
    const chat = view === "chat";
    ui.ask.dataset.view = view;
    ui.viewToggle.dataset.view = view;
    for (const button of ui.viewButtons) button.setAttribute("aria-pressed", String(button.dataset.view === view));
    ui.promptTitle.textContent = chat ? "Chat" : "Prompt";
    ui.completionView.hidden = chat;
    ui.completionOutput.hidden = chat;
    ui.send.hidden = chat;
    ui.chatView.hidden = !chat;
    ui.chatSend.hidden = !chat;
    ui.chatNew.hidden = !chat;
    ui.prompt.required = !chat;  // a hidden required field would block the chat's submit
    ui.temperature.max = chat ? "2" : "100";  // the OpenAI-shaped chat route takes 0..2
    if (changed && !state.running) {
      showError(null);
      ui.runStatus.textContent = "";
    }
  }

  function chatBody() {
    const messages = [];
    if (ui.chatSystem.value.trim()) messages.push({ role: "system", content: ui.chatSystem.value });
    for (const turn of state.chat.turns) messages.push({ role: turn.role, content: turn.content });
    return { messages, ...samplingParams("max_tokens") };
  }

  function scrollChat(force = false) {
    const box = ui.chatMessages;
    if (force || box.scrollTop + box.clientHeight >= box.scrollHeight - 48) box.scrollTop = box.scrollHeight;
  }

  /** A bubble in the conversation; its text goes in as a text node. */
  function addBubble(role, content) {
    const text = document.createTextNode(content);
    const bubble = el("div", { class: `msg ${role}`, "data-testid": "chat-message", "data-role": role },
      el("span", { class: "visually-hidden" }, role === "user" ? "You: " : "Answer: "),
      el("div", { class: "msg-text", "data-testid": "chat-text" }, text));
    ui.chatMessages.append(bubble);
    scrollChat(true);
    return { bubble, text };
  }

  /** Copy with the Clipboard API, or the old selection trick where it is missing or refused
   * (plain http pages other than localhost have no navigator.clipboard). */
  async function copyText(value) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(value);
        return true;
      }
    } catch { /* refused: try the fallback */ }
    const area = el("textarea", { class: "clipboard-helper", readonly: true, "aria-hidden": "true", tabindex: "-1" });
    area.value = value;
    document.body.append(area);
    const focused = document.activeElement;
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
    if (focused && typeof focused.focus === "function") focused.focus();
    return ok;
  }

  function copyButton(value) {
    const button = el("button", { type: "button", class: "link copy", "data-testid": "chat-copy", "aria-label": "Copy this answer" }, "Copy");
    let timer = null;
    button.addEventListener("click", async () => {
      const ok = await copyText(value);
      button.textContent = ok ? "Copied" : "Copy failed";
      button.dataset.state = ok ? "copied" : "failed";
      clearTimeout(timer);
      timer = setTimeout(() => {
        button.textContent = "Copy";
        delete button.dataset.state;
      }, COPIED_MS);
    });
    return button;
  }

  async function sendChat() {
    if (state.running) return;
    const content = ui.chatInput.value;
    if (!content.trim()) {
      ui.chatInput.focus();
      return;
    }
    if (!haveGateway()) return;
    const chat = state.chat;
    const question = { role: "user", content };
    chat.turns.push(question);
    const asked = addBubble("user", content);
    ui.chatInput.value = "";
    const body = chatBody();

    const controller = new AbortController();
    const started = performance.now();
    const entry = { time: new Date(), kind: "chat", model: body.model || null, node: null, tokens: 0, latency: null, status: "running" };
    const row = addLogRow(entry);
    state.running = controller;
    state.chatRun = controller;
    showError(null);
    setRunning(true, "chat");
    ui.runStatus.textContent = "Waiting for a node…";
    const { bubble, text } = addBubble("assistant", "");
    bubble.dataset.status = "streaming";
    let firstTokenMs = null;
    let answered = false;

    const append = (piece) => {
      if (typeof piece !== "string" || !piece) return;
      if (firstTokenMs === null) {
        firstTokenMs = performance.now() - started;
        ui.runStatus.textContent = "Streaming…";
      }
      text.appendData(piece);
      entry.tokens += 1;
      scrollChat();
    };

    try {
      const res = await api("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
      let final = null;
      if (body.stream) {
        for await (const { data } of sseEvents(res.body)) {
          if (data === "[DONE]") break;
          const payload = parseJson(data);
          if (!payload || typeof payload !== "object") continue;
          if (payload.error) throw streamError(payload.error);
          if (typeof payload.node === "string" && payload.node) entry.node = payload.node;
          if (routeHops(payload.route)) entry.route = routeHops(payload.route);
          const choice = Array.isArray(payload.choices) ? payload.choices[0] : null;
          append(choice?.delta?.content);
          if (typeof choice?.finish_reason === "string") final = payload;
          updateLogRow(row, { ...entry, status: "streaming" });
        }
        if (!final) throw new ApiError("the answer stream ended before the final event");
      } else {
        final = await res.json();
        const message = Array.isArray(final?.choices) ? final.choices[0]?.message : null;
        if (typeof message?.content === "string") text.data = message.content;
      }
      finishChat(entry, final, started, firstTokenMs);
      noteAnswer(entry);
      answered = true;
      updateLogRow(row, entry);
      ui.runStatus.textContent = "Done.";
    } catch (err) {
      const aborted = markFailed(entry, err, started);
      updateLogRow(row, entry);
      ui.runStatus.textContent = aborted ? "Stopped." : "Failed.";
      if (!aborted) showError(err instanceof ApiError ? err : new ApiError(String(err.message || err)));
    } finally {
      if (state.running === controller) {
        state.running = null;
        setRunning(false);
      }
      delete bubble.dataset.status;
      if (state.chat !== chat) {
        // "New chat" was pressed meanwhile: this conversation is gone.
      } else if (answered || text.data) {
        // A stopped or broken answer keeps what came, and the conversation goes on from it.
        chat.turns.push({ role: "assistant", content: text.data });
        bubble.dataset.status = entry.status;
        bubble.append(el("div", { class: "msg-foot" },
          el("span", { class: entry.status === "error" ? "bad" : null, "data-testid": "chat-meta", title: describeAnswer(null, entry) },
            chatNote(entry)),
          copyButton(text.data)));
        scrollChat();
      } else {
        // Nothing came back: take the question back, so that it can be sent again.
        bubble.remove();
        asked.bubble.remove();
        chat.turns.splice(chat.turns.indexOf(question), 1);
        if (!ui.chatInput.value) ui.chatInput.value = content;
      }
      refresh().catch(() => {});
    }
  }

  function finishChat(entry, final, started, firstTokenMs) {
    const usage = final && typeof final.usage === "object" && final.usage ? final.usage : {};
    const choice = Array.isArray(final?.choices) ? final.choices[0] : null;
    if (typeof final?.node === "string" && final.node) entry.node = final.node;
    entry.route = routeHops(final?.route) || entry.route || null;
    if (typeof final?.model === "string" && final.model) entry.model = final.model;
    if (isNum(usage.completion_tokens)) entry.tokens = usage.completion_tokens;
    entry.promptTokens = isNum(usage.prompt_tokens) ? usage.prompt_tokens : null;
    entry.latency = Math.round(performance.now() - started);
    entry.firstToken = firstTokenMs !== null ? Math.round(firstTokenMs) : null;
    entry.finish = typeof choice?.finish_reason === "string" ? choice.finish_reason : null;
    entry.cost = answerCost(final?.cost);  // when the gateway reports it for chat answers too
    entry.status = "ok";
  }

  /** The short line under an answer (the log row and the tooltip have the details). */
  function chatNote(entry) {
    const tokens = `${entry.tokens} token${entry.tokens === 1 ? "" : "s"}`;
    if (entry.status === "stopped") return `Stopped · ${tokens}`;
    if (entry.status === "error") return `Cut short: ${entry.error}`;
    const parts = [];
    if (entry.node) parts.push(`node ${shortId(entry.node)}`);
    if (entry.route) parts.push(`route of ${entry.route.length} spans`);
    parts.push(tokens);
    if (entry.latency !== null) parts.push(`${entry.latency} ms`);
    if (entry.finish === "length") parts.push("hit the token limit");
    return parts.join(" · ");
  }

  function newChat() {
    if (state.running && state.running === state.chatRun) state.running.abort();
    state.chat = { turns: [] };
    ui.chatMessages.replaceChildren();
    showError(null);
    ui.runStatus.textContent = "";
    ui.chatInput.focus();
  }

  // --- the query log ---------------------------------------------------------------------

  function addLogRow(entry) {
    const row = el("tr", { "data-testid": "log-row" });
    ui.log.prepend(row);
    while (ui.log.rows.length > MAX_LOG_ROWS) ui.log.lastElementChild.remove();
    ui.logEmpty.hidden = true;
    updateLogRow(row, entry);
    return row;
  }

  function updateLogRow(row, entry) {
    const statusText = entry.status === "ok"
      ? (entry.attempts > 1 ? `ok (${entry.attempts} attempts)` : "ok")
      : entry.status === "error" || entry.status === "stopped" ? entry.error : entry.status;
    const statusClass = entry.status === "ok" ? "good" : entry.status === "error" ? "bad" : entry.status === "stopped" ? "warn" : "busy";
    row.dataset.status = entry.status;
    row.dataset.kind = entry.kind || "completion";
    if (entry.node) row.dataset.node = entry.node;
    if (entry.route) row.dataset.route = entry.route.map((h) => `${h.peer}:${spanText(h.start, h.end)}`).join(" ");
    const who = entry.route
      ? el("td", { "data-label": "Node", "data-testid": "log-route", title: entry.route.map((h) => `${h.peer} ${spanText(h.start, h.end)}`).join("\n") },
        el("span", { class: "route-list" }, ...entry.route.map((h) => el("span", { class: "route-line" },
          el("span", { class: "mono" }, shortId(h.peer)), " ", el("span", { class: "hop-span" }, spanText(h.start, h.end))))))
      : el("td", { "data-label": "Node", title: entry.node || null }, el("span", { class: "mono" }, entry.node ? shortId(entry.node) : dash));
    row.replaceChildren(
      el("td", { "data-label": "Time", class: "nowrap" }, clock(entry.time)),
      who,
      el("td", { "data-label": "Model", class: "nowrap" }, el("span", { class: "cell" }, entry.model || "any",
        entry.kind === "chat" ? el("span", { class: "badge kind", title: "a chat answer (/v1/chat/completions)" }, "chat") : null)),
      el("td", { "data-label": "Tokens", class: "num" }, String(entry.tokens ?? 0)),
      el("td", { "data-label": "Latency", class: "num", title: entry.firstToken != null ? `first token ${entry.firstToken} ms` : null },
        entry.latency === null || entry.latency === undefined ? dash : `${entry.latency} ms`),
      el("td", { "data-label": "Status", "data-testid": "log-status", class: "status-cell" },
        el("span", { class: `status ${statusClass}`, title: entry.code || null }, statusText)),
      costCell(entry),
    );
  }

  /** What the answer cost this gateway, in credits, from its receipt; a dash without one.
   * The unit is in the column's header (the log shares its row with the prompt: no room
   * for "credits" in every row), in the cell's title and in its label on narrow screens. */
  function costCell(entry) {
    const cost = entry.cost || null;
    const title = cost
      ? `${costText(cost.mc)} credits: ${cost.mc} millicredits paid by this gateway to the node` +
        (cost.receipt !== null ? ` (receipt #${cost.receipt} in its ledger)` : "")
      : entry.status === "ok" ? "no receipt for this answer (a route of spans, or a gateway without credits)" : null;
    return el("td", { "data-label": "Cost (credits)", class: "num", "data-testid": "entry-cost", "data-millicredits": cost ? cost.mc : null, title },
      cost ? costText(cost.mc) : dash);
  }

  // --- the node explorer -----------------------------------------------------------------

  function renderNodes(data) {
    const nodes = Array.isArray(data?.nodes) ? data.nodes.filter((n) => n && typeof n === "object") : [];
    nodes.sort((a, b) => (b.online === true) - (a.online === true) || String(a.peer_id).localeCompare(String(b.peer_id)));
    ui.nodes.replaceChildren(...nodes.map(nodeRow));
    ui.nodesEmpty.hidden = nodes.length > 0;
    const online = isNum(data?.online) ? data.online : nodes.filter((n) => n.online === true).length;
    ui.nodesSummary.textContent = `${online} online of ${nodes.length}`;
  }

  function nodeRow(node) {
    const online = node.online === true;
    const load = node.load && typeof node.load === "object" ? node.load : {};
    const badges = [el("span", { class: `badge ${online ? "online" : "offline"}`, "data-testid": "node-status" }, online ? "online" : "offline")];
    if (isNum(node.backoff_s) && node.backoff_s > 0) badges.push(el("span", { class: "badge backoff" }, `backoff ${Math.ceil(node.backoff_s)}s`));
    if (typeof node.role === "string" && node.role && node.role !== "worker") badges.push(el("span", { class: "badge" }, node.role));
    if (node.registered === false) badges.push(el("span", { class: "badge", title: "not in the registry" }, "unregistered"));
    if (node.quarantined === true) {
      const why = typeof node.quarantine_reason === "string" ? node.quarantine_reason : "it failed an audit";
      badges.push(el("span", { class: "badge quarantined", title: `not routed to: ${why}`, "data-testid": "node-quarantined" }, "quarantined"));
    }

    const running = isNum(load.running) ? load.running : null;
    const capacity = isNum(load.capacity) ? load.capacity : null;
    const queued = isNum(load.queued) ? load.queued : 0;
    let loadText = running === null && capacity === null ? dash : `${running ?? "?"}/${capacity ?? "?"}`;
    if (queued > 0) loadText += ` +${queued} queued`;

    const spans = node.spans && typeof node.spans === "object" ? node.spans : {};
    const models = (Array.isArray(node.models) ? node.models.filter((m) => typeof m === "string") : [])
      .map((m) => Array.isArray(spans[m]) && spans[m].length === 2 && spans[m].every(isNum) ? `${m} (layers ${spanText(...spans[m])})` : m);
    const rate = isNum(node.success_rate) ? `${Math.round(node.success_rate * 100)}%` : dash;
    const requests = isNum(node.requests) && node.requests > 0 ? ` of ${node.requests}` : "";
    const seen = isNum(node.seen_ago_s) ? `last seen ${duration(node.seen_ago_s)} ago` : "never seen";
    const addrs = Array.isArray(node.addrs) ? node.addrs.filter((a) => typeof a === "string") : [];

    const peer = el("span", { class: "cell" }, el("button", { type: "button", class: "link mono peer-link", "data-testid": "node-select",
      "aria-label": `Show the charts of node ${typeof node.peer_id === "string" ? node.peer_id : ""}` }, shortId(node.peer_id)));
    if (typeof node.last_error === "string" && node.last_error) {
      peer.append(el("span", { class: "node-error", title: node.last_error }, node.last_error));
    }
    const peerCell = el("td", { "data-label": "Peer", title: [node.peer_id, ...addrs].join("\n") }, peer);
    const selected = typeof node.peer_id === "string" && node.peer_id === explorer.selected;
    return el("tr", { "data-testid": "node-row", "data-peer-id": typeof node.peer_id === "string" ? node.peer_id : "", "data-online": online ? "true" : "false",
      class: selected ? "selected" : null, "data-selected": selected ? "true" : null },
      el("td", { "data-label": "Status", title: seen }, el("span", { class: "cell" }, ...badges)),
      peerCell,
      el("td", { "data-label": "Models" }, models.length ? models.join(", ") : dash),
      el("td", { "data-label": "Load", class: "num", title: "running/capacity" }, loadText),
      el("td", { "data-label": "Uptime", class: "num" }, duration(node.uptime_s)),
      el("td", { "data-label": "Latency", class: "num", title: isNum(node.tokens_per_s) ? `${node.tokens_per_s} tokens/s` : null },
        isNum(node.latency_ms) ? `${Math.round(node.latency_ms)} ms` : dash),
      el("td", { "data-label": "Success", class: "num" }, rate + requests),
      el("td", { "data-label": "Reputation", class: "num", "data-testid": "node-reputation", title: "observed by this gateway: errors and stalls lower it, successes raise it" },
        isNum(node.reputation) ? node.reputation.toFixed(2) : dash),
      creditsCell(node.credits),
    );
  }

  /** A node's credits as its heartbeats gossip them: "+earned / -spent", and "forked" when
   * it was caught signing two different ledgers. Absent for a node whose heartbeat has none. */
  function creditsCell(info) {
    const credits = info && typeof info === "object" && !Array.isArray(info) ? info : null;
    const earned = millicredits(credits?.earned_mc);
    const spent = millicredits(credits?.spent_mc);
    const forked = credits?.forked === true;
    const known = earned !== null && spent !== null;
    const lines = ["credits earned serving / spent asking (millicredits/1000), from the node's gossiped ledger summary"];
    if (known) {
      lines.push(`${earned} millicredits earned, ${spent} spent` + (millicredits(credits.seq) !== null ? `, ${credits.seq} ledger records` : ""));
      const verified = credits.verified_balance_mc;
      lines.push(isNum(verified) ? `balance checked by this gateway against the ledger: ${totalText(verified)} credits` : "balance not checked by this gateway yet");
    } else {
      lines.push("this node's heartbeats carry no ledger");
    }
    if (forked) lines.push("FORKED: it signed two different ledgers; its credits cannot be trusted");
    return el("td", { "data-label": "Credits", class: "num credits", "data-testid": "node-credits", title: lines.join("\n"),
      "data-earned-mc": earned, "data-spent-mc": spent, "data-forked": forked ? "true" : null },
    el("span", { class: "cell" }, ...(known ? [el("span", { class: "nowrap" }, `+${totalText(earned)}`), " / ", el("span", { class: "nowrap" }, `-${totalText(spent)}`)] : [dash]),
      forked ? el("span", { class: "badge forked", "data-testid": "node-forked" }, "forked") : null));
  }

  // --- the network map and per-node charts ---------------------------------------------------
  //
  // Drawn as plain SVG. The map: this gateway in the middle, every node it knows around it,
  // an edge to each coloured by how the gateway reaches it (direct, hole-punched, relayed or
  // not connected), and the path of the last answer on top. The panel beside it: the
  // selected node's last hour from /api/history/{peer_id}, or the gateway's own.

  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_MAP_NODES = 300;
  const PATHS = ["direct", "hole-punched", "relayed"];
  const PATH_TEXT = { direct: "direct", "hole-punched": "direct (hole-punched)", relayed: "relayed", none: "not connected" };
  const ROLE = /^[a-z][a-z-]{0,23}$/;

  const explorer = {
    rows: [],  // the last /api/nodes rows
    selected: null,  // the peer id whose charts show; null: the gateway's
    history: null,  // {peer, data, error}: the last history fetched, for the selection it was for
    answer: null,  // the last answer's path: {node, hops: [peer ids]}
    width: 0,
  };

  /** Build an SVG element, like el(): attributes as strings, children as nodes or text. */
  function svgEl(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const peerOf = (row) => (typeof row?.peer_id === "string" ? row.peer_id : "");
  const pathOf = (row) => (PATHS.includes(row?.path) ? row.path : "none");
  const roleOf = (row) => (typeof row?.role === "string" && ROLE.test(row.role) ? row.role : "worker");
  const tail = (id) => (id.length > 8 ? `…${id.slice(-6)}` : id);

  /** The history to ask for: the selected node's, else the gateway's alone (small). */
  const historyPath = (peer) => (peer ? `/api/history/${encodeURIComponent(peer)}` : "/api/history?nodes=false");

  /** Fetch the history of the selection; never throws (the error is kept to be shown). */
  async function loadHistory() {
    const peer = explorer.selected;
    let result;
    try {
      result = { peer, data: await getJson(historyPath(peer)), error: null };
    } catch (err) {
      const error = err instanceof ApiError && err.status === 404
        ? (peer ? "No samples of this node yet." : "This gateway keeps no history.")
        : err instanceof ApiError ? err.display : String(err);
      result = { peer, data: null, error };
    }
    if (peer === explorer.selected) explorer.history = result;
  }

  function renderExplorer(data) {
    if (data) explorer.rows = Array.isArray(data.nodes) ? data.nodes.filter((n) => n && typeof n === "object" && peerOf(n)) : [];
    const rows = explorer.rows;
    const online = rows.filter((n) => n.online === true);
    const paths = PATHS.map((p) => [p, online.filter((n) => pathOf(n) === p).length]).filter(([, n]) => n);
    const hidden = rows.length - renderMap();
    ui.explorerSummary.textContent = `${online.length} of ${rows.length} online` +
      (paths.length ? ` · ${paths.map(([p, n]) => `${n} ${p}`).join(", ")}` : "") + (hidden > 0 ? ` · ${hidden} not drawn` : "");
    renderDetail();
  }

  /** Points for n nodes on rings around (cx, cy), outer ring first, each ring as full as
   * its length allows; fewer than n points when they do not all fit. */
  function ringLayout(n, cx, cy, rx, ry, r) {
    const points = [];
    for (let ring = 0; points.length < n; ring++) {
      const k = 1 - ring * 0.27;
      if (k < 0.35) break;
      const a = rx * k, b = ry * k;
      const around = Math.PI * (3 * (a + b) - Math.sqrt((3 * a + b) * (a + 3 * b)));  // Ramanujan
      const here = Math.min(n - points.length, Math.max(1, Math.floor(around / (2 * r + 8))));
      for (let i = 0; i < here; i++) {
        const angle = -Math.PI / 2 + (2 * Math.PI * (i + (ring % 2) * 0.5)) / here;
        points.push([cx + a * Math.cos(angle), cy + b * Math.sin(angle)]);
      }
    }
    return points;
  }

  /** Draw the map at the width it has; returns how many nodes it could draw. */
  function renderMap() {
    const svg = ui.map;
    const width = Math.max(240, Math.round(svg.getBoundingClientRect().width || 600));
    const height = Math.round(width < 560 ? width * 0.8 : Math.min(460, Math.max(300, width * 0.6)));
    explorer.width = width;
    const focused = document.activeElement && svg.contains(document.activeElement) ? document.activeElement.dataset.peerId ?? "" : null;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);

    const rows = [...explorer.rows].sort((a, b) => peerOf(a).localeCompare(peerOf(b)));  // stable places
    const n = Math.min(rows.length, MAX_MAP_NODES);
    const r = n > 60 ? 5 : n > 24 ? 8 : 12;
    const labels = n <= 16;
    const cx = width / 2, cy = height / 2;
    const points = ringLayout(n, cx, cy, cx - r - (labels ? 30 : 8), cy - r - (labels ? 18 : 8), r);
    const answer = explorer.answer;
    const hops = answer ? (answer.hops.length ? answer.hops : answer.node ? [answer.node] : []) : [];
    const edges = svgEl("g", { class: "edges" });
    const path = svgEl("g", { class: "answer" });
    const nodes = svgEl("g", { class: "nodes" });

    points.forEach(([x, y], i) => {
      const row = rows[i];
      const peer = peerOf(row), how = pathOf(row), role = roleOf(row);
      const online = row.online === true, quarantined = row.quarantined === true;
      const selected = peer === explorer.selected;
      const hop = hops.indexOf(peer);
      const [px, py] = [x.toFixed(1), y.toFixed(1)];
      edges.append(svgEl("line", { class: `edge path-${how}${online ? "" : " offline"}`, x1: cx, y1: cy, x2: px, y2: py,
        "data-testid": "map-edge", "data-peer-id": peer, "data-path": how }));
      if (hop >= 0) {
        path.append(svgEl("line", { class: "answer-path", x1: cx, y1: cy, x2: px, y2: py, "data-testid": "map-answer", "data-peer-id": peer, "data-hop": hop + 1 }));
      }
      const status = [online ? "online" : "offline", PATH_TEXT[how], quarantined ? "quarantined" : null, hop >= 0 ? "made the last answer" : null].filter(Boolean);
      const classes = ["map-node", `role-${role}`, online ? "online" : "offline", quarantined ? "quarantined" : null, selected ? "selected" : null, hop >= 0 ? "answered" : null];
      nodes.append(svgEl("g", {
        class: classes.filter(Boolean).join(" "), transform: `translate(${px} ${py})`, tabindex: "0", role: "button",
        "aria-pressed": String(selected), "aria-label": `${role} ${peer}: ${status.join(", ")}`,
        "data-testid": "map-node", "data-peer-id": peer, "data-role": role, "data-online": String(online), "data-path": how,
        "data-quarantined": String(quarantined),
      },
      svgEl("title", {}, [`${role} ${peer}`, ...status].join("\n")),
      svgEl("circle", { class: "hit", r: r + 8 }),
      selected ? svgEl("circle", { class: "ring", r: r + 5 }) : null,
      svgEl("circle", { class: `dot role-${role}`, r }),
      quarantined ? svgEl("path", { class: "q-mark", d: `M${-r / 2} ${-r / 2}L${r / 2} ${r / 2}M${r / 2} ${-r / 2}L${-r / 2} ${r / 2}` }) : null,
      hop >= 0 && hops.length > 1 ? svgEl("text", { class: "hop-number", x: r + 3, y: -r, "aria-hidden": "true" }, String(hop + 1)) : null,
      labels ? svgEl("text", { class: "label", y: r + 13, "text-anchor": "middle", "aria-hidden": "true" }, tail(peer)) : null));
    });

    const center = !explorer.selected;
    const gateway = svgEl("g", {
      class: `map-gateway${center ? " selected" : ""}`, transform: `translate(${cx} ${cy})`, tabindex: "0", role: "button",
      "aria-pressed": String(center), "aria-label": "this gateway: show its charts", "data-testid": "map-gateway", "data-role": "gateway",
      "data-peer-id": "",
    },
    svgEl("title", {}, `this gateway${state.gateway ? ` (${state.gateway})` : ""}`),
    center ? svgEl("circle", { class: "ring", r: 23 }) : null,
    svgEl("circle", { class: "dot role-gateway", r: 18 }),
    svgEl("text", { class: "gw-text", "text-anchor": "middle", dy: "0.35em", "aria-hidden": "true" }, "GW"),
    svgEl("text", { class: "label", y: 18 + 14, "text-anchor": "middle", "aria-hidden": "true" }, rows.length ? "this gateway" : "this gateway · no nodes yet"));
    svg.replaceChildren(edges, path, nodes, gateway);
    if (focused !== null) {
      const again = svg.querySelector(`[data-peer-id="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
    return points.length;
  }

  function selectNode(peer) {
    if (peer === explorer.selected) return;
    explorer.selected = peer || null;
    explorer.history = null;
    for (const row of ui.nodes.rows) {
      const on = Boolean(peer) && row.dataset.peerId === peer;
      row.classList.toggle("selected", on);
      if (on) row.dataset.selected = "true"; else delete row.dataset.selected;
    }
    renderMap();
    renderDetail();
    loadHistory().then(renderDetail);  // at once, not at the next refresh
  }

  /** The path of the answer just made, for the map. */
  function noteAnswer(entry) {
    explorer.answer = { node: entry.node || null, hops: (entry.route || []).map((h) => h.peer) };
    renderMap();
  }

  // --- the selection's panel ---------------------------------------------------------------

  /** A series of the history as numbers or null, as long as its times. */
  function seriesOf(data, name) {
    const values = Array.isArray(data?.series?.[name]) ? data.series[name] : [];
    return values.map((v) => (isNum(v) ? v : null));
  }

  /** Per sample, how much a cumulative count grew since the one before (null: unknown). */
  const increments = (values) => values.map((v, i) => (i && v !== null && values[i - 1] !== null ? Math.max(0, v - values[i - 1]) : null));

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    return [1, 2, 2.5, 5, 10].find((m) => m * p >= v * 0.9999) * p;
  }

  function fmt(v, unit = "") {
    if (!isNum(v)) return dash;
    const text = Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1);
    return unit ? `${text} ${unit}` : text;
  }

  /** A small line chart: one SVG stretched to its box (strokes keep their width), its
   * words in HTML around it. Gaps (unknown values) break the line. */
  function chart(key, title, t, values, { unit = "", value = null, kind = "" } = {}) {
    const W = 300, H = 80, PAD = 5;
    const times = t.filter(isNum);
    const t0 = times[0], t1 = times[times.length - 1];
    const points = values.map((v, i) => (isNum(v) && isNum(t[i]) ? [t[i], v] : null));
    const known = points.filter(Boolean);
    const top = niceMax(Math.max(0, ...known.map((p) => p[1])));
    const x = (tt) => (t1 > t0 ? ((tt - t0) / (t1 - t0)) * W : W);
    const y = (v) => H - PAD - ((H - 2 * PAD) * v) / top;
    const shapes = [svgEl("line", { class: "grid", x1: 0, y1: H - PAD, x2: W, y2: H - PAD })];
    let run = [];
    const flush = () => {
      if (!run.length) return;
      const line = run.map(([tt, v]) => `${x(tt).toFixed(1)},${y(v).toFixed(1)}`);
      if (run.length === 1) line.push(line[0]);  // one sample: a dot
      shapes.push(svgEl("polygon", { class: "area", points: `${x(run[0][0]).toFixed(1)},${H - PAD} ${line.join(" ")} ${x(run[run.length - 1][0]).toFixed(1)},${H - PAD}` }));
      shapes.push(svgEl("polyline", { class: "line", points: line.join(" ") }));
      run = [];
    };
    for (const p of points) {
      if (p) run.push(p); else flush();
    }
    flush();
    const latest = known.length ? known[known.length - 1][1] : null;
    const max = known.length ? Math.max(...known.map((p) => p[1])) : null;
    const label = known.length ? `${title}: ${known.length} samples, from ${fmt(Math.min(...known.map((p) => p[1])), unit)} to ${fmt(max, unit)}, now ${fmt(latest, unit)}`
      : `${title}: no data yet`;
    return el("figure", { class: `chart${kind ? ` ${kind}` : ""}`, "data-testid": "chart", "data-series": key, "data-points": known.length },
      el("figcaption", { class: "chart-head" }, el("span", { class: "chart-title" }, title),
        el("span", { class: "chart-value", "data-testid": "chart-value" }, value ?? fmt(latest, unit))),
      svgEl("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": label }, ...shapes),
      el("div", { class: "chart-foot" },
        el("span", {}, isNum(t0) ? clock(new Date(t0 * 1000)) : dash),
        el("span", {}, known.length ? `max ${fmt(max, unit)}` : "no data yet"),
        el("span", {}, isNum(t1) ? clock(new Date(t1 * 1000)) : dash)));
  }

  /** Online or offline at each sample, as a strip of coloured cells along time. */
  function uptimeStrip(t, online, interval) {
    const W = 1000;
    const idx = t.map((tt, i) => i).filter((i) => isNum(t[i]));
    const t0 = t[idx[0]], t1 = t[idx[idx.length - 1]];
    const step = isNum(interval) && interval > 0 ? interval : 10;
    const span = Math.max(t1 - t0 + step, step);
    const x = (tt) => ((tt - t0) / span) * W;
    const kind = (i) => (online[i] === 1 ? "on" : online[i] === 0 ? "off" : "unknown");
    const cells = [];
    idx.forEach((i, k) => {  // one cell per run of samples alike, up to the next sample
      if (k && kind(i) === kind(idx[k - 1])) return;
      let last = k;
      while (last + 1 < idx.length && kind(idx[last + 1]) === kind(i)) last++;
      const end = last + 1 < idx.length ? t[idx[last + 1]] : t[idx[last]] + step;
      cells.push(svgEl("rect", { class: kind(i), x: x(t[i]).toFixed(2), y: 0, width: Math.max(0.5, x(end) - x(t[i])).toFixed(2), height: 10,
        "data-testid": "uptime-cell", "data-state": kind(i) }));
    });
    const up = idx.filter((i) => online[i] === 1).length;
    const share = idx.length ? Math.round((100 * up) / idx.length) : 0;
    const text = idx.length ? `Online in ${up} of ${idx.length} samples (${share}%) over ${duration(t1 - t0 + step)}` : "No samples yet";
    return el("div", { class: "uptime", "data-testid": "uptime-strip", "data-samples": idx.length, "data-online": up },
      el("div", { class: "chart-head" }, el("span", { class: "chart-title" }, "Uptime"), el("span", { class: "chart-value" }, idx.length ? `${share}%` : dash)),
      svgEl("svg", { viewBox: `0 0 ${W} 10`, preserveAspectRatio: "none", role: "img", "aria-label": text }, ...cells),
      el("p", { class: "hint" }, text));
  }

  function facts(items) {
    return el("dl", { class: "facts" }, ...items.filter(Boolean).map(([label, value, testid]) =>
      el("div", {}, el("dt", {}, label), el("dd", { "data-testid": testid || null }, value))));
  }

  function historyNote(hist) {
    if (hist?.error) return el("p", { class: "hint", "data-testid": "detail-note" }, hist.error);
    if (!hist) return el("p", { class: "hint", "data-testid": "detail-note" }, "Loading its history…");
    if (hist.data?.enabled === false) return el("p", { class: "hint", "data-testid": "detail-note" }, "This gateway keeps no history.");
    const interval = hist.data?.interval_s;
    return el("p", { class: "hint", "data-testid": "detail-note" },
      `Sampled by this gateway every ${isNum(interval) ? interval : "?"} s; the last ${isNum(hist.data?.capacity) ? hist.data.capacity : "?"} samples are kept.`);
  }

  function renderDetail() {
    const peer = explorer.selected;
    const hist = explorer.history && explorer.history.peer === peer ? explorer.history : null;
    ui.nodeDetail.dataset.peerId = peer || "";
    ui.nodeDetail.replaceChildren(...(peer ? nodeDetail(peer, hist) : gatewayDetail(hist)).filter(Boolean));
  }

  function gatewayDetail(hist) {
    const data = hist?.data?.gateway;  // {samples, series}
    const t = seriesOf(data, "t");
    return [
      el("div", { class: "detail-head" }, el("h3", {}, "This gateway")),
      el("p", { class: "hint" }, "Select a node on the map or in the nodes table to see its last hour."),
      el("div", { class: "charts", "data-testid": "gateway-charts" },
        chart("online", "Nodes online", t, seriesOf(data, "online")),
        chart("requests", "Requests", t, increments(seriesOf(data, "requests")), { unit: "per sample" }),
        chart("errors", "Errors", t, increments(seriesOf(data, "errors")), { unit: "per sample", kind: "errors" })),
      registryHistory(data, isNum(hist?.data?.now) ? hist.data.now : Date.now() / 1000),
      historyNote(hist),
    ];
  }

  const MAX_PUBLICATIONS_SHOWN = 10;
  const cidText = (v) => (typeof v === "string" && /^[A-Za-z0-9]+$/.test(v) ? v : null);

  /** The registry over time: its live records and blocks, and its last publications
   * (newest first), from the gateway's history; every field checked, none trusted. */
  function registryHistory(data, now) {
    const t = seriesOf(data, "t");
    const seen = Array.isArray(data?.publications) ? data.publications : [];
    const publications = seen.filter((p) => p && typeof p === "object" && cidText(p.cid) && isNum(p.first_seen))
      .sort((a, b) => b.first_seen - a.first_seen).slice(0, MAX_PUBLICATIONS_SHOWN);
    const ipfs = normalizeHttpUrl(ui.ipfsGateway.value || DEFAULT_IPFS_GATEWAY);
    const rows = publications.map((p) => {
      const cid = cidText(p.cid), head = cidText(p.head);
      const named = isNum(p.named_at);
      return el("li", { "data-testid": "publication", "data-cid": cid },
        ipfs ? el("a", { class: "mono", href: `${ipfs}/ipfs/${cid}/blockchain.json`, target: "_blank", rel: "noopener noreferrer", title: cid }, shortHash(cid))
          : el("span", { class: "mono", title: cid }, shortHash(cid)),
        el("span", { class: "hint", title: head ? `head ${head}` : null },
          `head ${shortHash(head)}${isNum(p.blocks) ? ` · ${p.blocks} blocks` : ""} · ${duration(Math.max(0, now - p.first_seen))} ago`),
        named ? el("span", { class: "badge online", title: `the registry's IPNS name pointed here ${duration(Math.max(0, now - p.named_at))} ago` }, "IPNS") : null);
    });
    return el("div", { class: "registry-history", "data-testid": "registry-history" },
      el("div", { class: "charts" },
        chart("records", "Live records", t, seriesOf(data, "records")),
        chart("blocks", "Registry blocks", t, seriesOf(data, "blocks"))),
      el("div", { class: "chart-head publications-head" }, el("span", { class: "chart-title" }, "Publications"),
        el("span", { class: "chart-value" }, seen.length > publications.length ? `last ${publications.length} of ${seen.length}` : String(publications.length))),
      rows.length ? el("ol", { class: "publications" }, ...rows)
        : el("p", { class: "hint", "data-testid": "publications-empty" }, "None seen since this gateway started."));
  }

  function nodeDetail(peer, hist) {
    const row = explorer.rows.find((n) => peerOf(n) === peer) || null;
    const data = hist?.data;
    const t = seriesOf(data, "t");
    const online = row?.online === true;
    const role = roleOf(row ?? data);
    const badges = [el("span", { class: `badge ${online ? "online" : "offline"}` }, online ? "online" : "offline")];
    if (role !== "worker") badges.push(el("span", { class: "badge" }, role));
    if (row?.quarantined === true) {
      badges.push(el("span", { class: "badge quarantined", title: typeof row.quarantine_reason === "string" ? row.quarantine_reason : null }, "quarantined"));
    }
    if (row) badges.push(el("span", { class: "badge" }, PATH_TEXT[pathOf(row)]));

    const load = row?.load && typeof row.load === "object" ? row.load : {};
    const spans = row?.spans && typeof row.spans === "object" ? row.spans : {};
    const spanList = Object.entries(spans).filter(([, s]) => Array.isArray(s) && s.length === 2 && s.every(isNum)).map(([m, s]) => `${m} ${spanText(...s)}`);
    const models = Array.isArray(row?.models) ? row.models.filter((m) => typeof m === "string") : [];
    const audits = row?.audits && typeof row.audits === "object" ? row.audits : {};
    const credits = row?.credits && typeof row.credits === "object" ? row.credits : null;
    const earned = millicredits(credits?.earned_mc), spent = millicredits(credits?.spent_mc);
    const rate = isNum(row?.success_rate) ? `${Math.round(row.success_rate * 100)}%${isNum(row.requests) ? ` of ${row.requests}` : ""}` : dash;
    const throughput = seriesOf(data, "tokens_per_s");
    const tokens = throughput.some(isNum) ? throughput : seriesOf(data, "decode_tokens_per_s");
    const errors = increments(seriesOf(data, "errors"));
    const errorsTotal = errors.filter(isNum).reduce((a, b) => a + b, 0);
    const queued = seriesOf(data, "queued");
    const running = isNum(load.running) ? load.running : null;

    return [
      el("div", { class: "detail-head" }, el("h3", {}, role === "worker" ? "Worker" : capitalize(role)),
        el("button", { type: "button", class: "link", "data-testid": "detail-close" }, "Show the gateway")),
      el("p", { class: "mono detail-id", "data-testid": "detail-peer" }, peer),
      el("p", { class: "cell detail-badges" }, ...badges),
      row ? null : el("p", { class: "hint" }, "Not in this gateway's node table any more."),
      facts([
        ["Models", models.length ? models.join(", ") : dash, "detail-models"],
        spanList.length ? ["Spans (layers)", spanList.join(", "), "detail-spans"] : null,
        ["Reputation", isNum(row?.reputation) ? row.reputation.toFixed(2) : dash, "detail-reputation"],
        ["Success", rate, "detail-success"],
        ["Audits", isNum(audits.passed) || isNum(audits.failed) ? `${audits.passed ?? 0} passed, ${audits.failed ?? 0} failed` : dash, "detail-audits"],
        ["Credits", earned !== null && spent !== null ? `+${totalText(earned)} / -${totalText(spent)}${credits.forked === true ? " (forked)" : ""}` : dash, "detail-credits"],
        ["Uptime", duration(row?.uptime_s), "detail-uptime"],
      ]),
      uptimeStrip(t, seriesOf(data, "online"), data?.interval_s),
      el("div", { class: "charts", "data-testid": "node-charts" },
        chart("tokens_per_s", "Tokens/s", t, tokens, { unit: "tok/s" }),
        chart("latency_ms", "Latency (first token)", t, seriesOf(data, "latency_ms"), { unit: "ms" }),
        chart("queued", "Queue", t, queued, { value: `${fmt(queued.filter(isNum).pop() ?? null)} waiting${running !== null ? `, ${running} running` : ""}` }),
        chart("errors", "Errors", t, errors, { kind: "errors", value: `${errorsTotal} in ${t.length > 1 ? duration(t[t.length - 1] - t[0]) : dash}` })),
      historyNote(hist),
    ];
  }

  // --- spans: models served in parts ------------------------------------------------------

  function renderSpans(data) {
    // {model: {fingerprint, layers, spans, complete, route, full_workers}}
    const models = data && typeof data === "object" && !Array.isArray(data)
      ? Object.entries(data).filter(([, entry]) => entry && typeof entry === "object" && Array.isArray(entry.spans)) : [];
    ui.spans.replaceChildren(...models.map(([name, entry]) => spanModel(name, entry)));
    ui.spansEmpty.hidden = models.length > 0;
    const complete = models.filter(([, entry]) => entry.complete === true).length;
    ui.spansSummary.textContent = models.length
      ? `${complete} of ${models.length} model${models.length === 1 ? "" : "s"} with a complete route` : "";
  }

  /** The layer ranges no span holds, as [start, end] pairs. */
  function missingLayers(spans, layers) {
    const held = new Array(layers).fill(false);
    for (const s of spans) for (let i = Math.max(0, s.start); i < Math.min(layers, s.end); i++) held[i] = true;
    const gaps = [];
    for (let i = 0; i < layers; i++) {
      if (held[i]) continue;
      if (gaps.length && gaps[gaps.length - 1][1] === i) gaps[gaps.length - 1][1] = i + 1;
      else gaps.push([i, i + 1]);
    }
    return gaps;
  }

  function spanModel(name, entry) {
    const layers = isNum(entry.layers) && entry.layers > 0 && entry.layers <= 100000 ? entry.layers : null;
    const spans = (Array.isArray(entry.spans) ? entry.spans : [])
      .filter((s) => s && typeof s.peer_id === "string" && Array.isArray(s.span) && s.span.length === 2 && s.span.every(isNum))
      .map((s) => ({ ...s, start: s.span[0], end: s.span[1] }));
    const complete = entry.complete === true;
    const gaps = layers ? missingLayers(spans, layers) : [];
    const full = isNum(entry.full_workers) ? entry.full_workers : 0;
    const facts = [
      layers ? `${layers} layers` : null,
      typeof entry.fingerprint === "string" ? `weights ${shortHash(entry.fingerprint.replace(/^sha256:/, ""))}` : null,
      `${full} whole-model worker${full === 1 ? "" : "s"}`,
      gaps.length ? `missing layers ${gaps.map(([a, b]) => spanText(a, b)).join(", ")}` : null,
    ].filter(Boolean).join(" · ");
    const bar = el("div", { class: "span-bar", "aria-hidden": "true" },
      ...(layers ? spans.map((s) => el("span", {
        class: "span-seg",
        style: `left:${(100 * s.start / layers).toFixed(3)}%;width:${(100 * (s.end - s.start) / layers).toFixed(3)}%`,
        title: `${s.peer_id} ${spanText(s.start, s.end)}`,
      })) : []));
    const route = routeHops(entry.route);
    const rows = spans.map((s) => {
      const load = s.load && typeof s.load === "object" ? s.load : {};
      const sessions = isNum(load.sessions) ? `${load.sessions}/${isNum(load.max_sessions) ? load.max_sessions : "?"}` : dash;
      const kv = isNum(load.kv_cache_mb) && isNum(load.kv_cache_budget_mb) ? `${Math.round(load.kv_cache_mb)} of ${Math.round(load.kv_cache_budget_mb)} MB` : dash;
      const inRoute = route && route.some((h) => h.peer === s.peer_id);
      const badges = [];
      if (inRoute) badges.push(el("span", { class: "badge online" }, "in route"));
      if (isNum(s.backoff_s) && s.backoff_s > 0) badges.push(el("span", { class: "badge backoff" }, `backoff ${Math.ceil(s.backoff_s)}s`));
      return el("tr", { "data-testid": "span-row", "data-peer-id": s.peer_id, "data-span": spanText(s.start, s.end) },
        el("td", { "data-label": "Layers", class: "num" }, spanText(s.start, s.end)),
        el("td", { "data-label": "Peer", title: s.peer_id }, el("span", { class: "mono" }, shortId(s.peer_id))),
        el("td", { "data-label": "Sessions", class: "num" }, sessions),
        el("td", { "data-label": "KV cache", class: "num" }, kv),
        el("td", { "data-label": "Cost", class: "num", title: "expected ms for a typical answer: measured speed, load and reputation" },
          isNum(s.cost_ms) ? `${Math.round(s.cost_ms)} ms` : dash),
        el("td", { "data-label": "Status" }, badges.length ? el("span", { class: "cell" }, ...badges) : dash));
    });
    return el("div", { class: "span-model", "data-testid": "span-model", "data-model": name, "data-complete": complete ? "true" : "false" },
      el("div", { class: "span-head" },
        el("strong", {}, name),
        el("span", { class: `badge ${complete ? "online" : "backoff"}`, "data-testid": "span-complete" }, complete ? "complete route" : "no complete route"),
        el("span", { class: "hint", "data-testid": "span-facts" }, facts)),
      bar,
      route ? el("p", { class: "meta route", "data-testid": "span-route" }, "Route now: ", hopsView(route, "span-route-hop")) : null,
      el("div", { class: "table-wrap" }, el("table", { class: "stack" },
        el("thead", {}, el("tr", {}, ...["Layers", "Peer", "Sessions", "KV cache", "Cost", "Status"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, ...rows))));
  }

  function renderRegistry(info) {
    const head = typeof info?.head === "string" ? info.head : null;
    ui.registryHead.textContent = shortHash(head);
    ui.registryHead.title = head || "";
    const cid = typeof info?.cid === "string" && info.cid ? info.cid : null;
    ui.registryCid.replaceChildren();
    if (cid) {
      const ipfs = normalizeHttpUrl(ui.ipfsGateway.value || DEFAULT_IPFS_GATEWAY);
      if (ipfs && /^[A-Za-z0-9]+$/.test(cid)) {
        ui.registryCid.append(el("a", { href: `${ipfs}/ipfs/${cid}/blockchain.json`, target: "_blank", rel: "noopener noreferrer", title: cid }, shortHash(cid)));
      } else {
        ui.registryCid.append(el("span", { title: cid }, shortHash(cid)));
      }
    } else {
      ui.registryCid.textContent = "not published";
    }
    const blocks = info?.blocks;
    ui.registryBlocks.textContent = isNum(blocks) ? String(blocks) : Array.isArray(blocks) ? String(blocks.length) : dash;
    ui.registryMode.textContent = typeof info?.mode === "string" ? info.mode : dash;
    renderIpns(info);
  }

  /** Where the registry's IPNS name points and since when; "off" said plainly. */
  function renderIpns(info) {
    const ago = (t) => (isNum(t) ? `${Math.max(0, Math.round(Date.now() / 1000 - t))} s ago` : "never");
    const name = typeof info?.ipns === "string" && /^[A-Za-z0-9]+$/.test(info.ipns) ? info.ipns : null;
    const via = info?.ipns_via;
    let text;
    let title = "";
    if (via === "off") {
      text = "off (no IPFS daemon, no network)";
    } else if (name) {
      const target = typeof info.ipns_cid === "string" && /^[A-Za-z0-9]+$/.test(info.ipns_cid) ? shortHash(info.ipns_cid) : dash;
      text = `${shortHash(name)} → ${target}, ${ago(info.ipns_at)}`;
      title = `/ipns/${name}` + (via === "dht" ? "\non the network's DHT: dllm nodes resolve it, public IPFS gateways do not" : "\nthrough Kubo");
    } else {
      text = via === "kubo" || via === "dht" ? "not published yet" : dash;
    }
    ui.registryIpns.textContent = text;
    ui.registryIpns.title = title;
    ui.registryPublished.textContent = isNum(info?.published_at) ? ago(info.published_at) : dash;
  }

  function renderModels(data) {
    const list = Array.isArray(data?.data) ? data.data.filter((m) => m && typeof m.id === "string") : [];
    state.models = new Map(list.map((m) => [m.id, {
      chat: m.chat === true,
      fingerprints: Array.isArray(m.fingerprints) ? m.fingerprints.filter((f) => typeof f === "string") : [],
    }]));
    const chosen = ui.model.value;
    const label = (id) => !state.models.has(id) ? `${id} (no live node)` : state.models.get(id).chat ? `${id} (chat)` : id;
    const wanted = [...new Set(chosen && !state.models.has(chosen) ? [...state.models.keys(), chosen] : state.models.keys())];
    const current = [...ui.model.options].slice(1).map((o) => [o.value, o.textContent]);
    // Rebuilt only when something changed, to keep an open dropdown undisturbed.
    if (current.length !== wanted.length || current.some(([value, text], i) => value !== wanted[i] || text !== label(value))) {
      ui.model.replaceChildren(el("option", { value: "" }, "any model"),
        ...wanted.map((id) => el("option", { value: id }, label(id))));
      ui.model.value = chosen;
    }
    applyView();
    renderModelHint();
  }

  /** Which model the selection means: chat or base, and the weights it is served with. */
  function renderModelHint() {
    const id = ui.model.value;
    const info = state.models.get(id);
    if (!id || !info) {
      ui.modelHint.dataset.model = "";
      return;  // keep the static text: how a worker picks its model
    }
    const prints = info.fingerprints.map((f) => shortHash(f.replace(/^sha256:/, ""))).join(", ");
    const kind = info.chat ? "a chat model (its chat template is applied)" : "a base model (text is continued)";
    ui.modelHint.dataset.model = id;
    ui.modelHint.textContent = `${id}: ${kind}` + (prints ? `; weights ${prints}` : "") +
      ". Workers pick their model at start: python -m dllm_p2p --model SPEC.";
  }

  /** This gateway's own ledger, from /api/credits: one small line under the nodes. */
  function renderGatewayCredits(info) {
    const on = info && typeof info === "object" && info.enabled === true;
    const balance = on && isNum(info.balance) ? info.balance : null;
    const spent = on ? millicredits(info.spent) : null;
    const receipts = on ? millicredits(info.receipts) : null;
    if (balance === null || spent === null) {
      ui.gatewayCredits.hidden = true;
      ui.gatewayCredits.replaceChildren();
      return;
    }
    const over = receipts !== null && Number.isInteger(receipts) ? ` over ${receipts} paid answer${receipts === 1 ? "" : "s"}` : "";
    const earned = millicredits(info.earned);
    const forks = Array.isArray(info.forks) ? info.forks.length : 0;
    ui.gatewayCredits.textContent = `This gateway: balance ${totalText(balance)} credits, spent ${totalText(spent)}${over}` +
      (earned ? `, earned ${totalText(earned)}` : "") + (forks ? ` · ${forks} forked ledger${forks === 1 ? "" : "s"} seen` : "") + ".";
    ui.gatewayCredits.title = "From this gateway's own signed ledger (/api/credits): it pays the node for every answer, " +
      "with a receipt both sign. Amounts in credits (millicredits/1000).";
    ui.gatewayCredits.dataset.balanceMc = String(balance);
    ui.gatewayCredits.dataset.spentMc = String(spent);
    ui.gatewayCredits.hidden = false;
  }

  function renderHealth(kind, text) {
    ui.health.textContent = text;
    ui.health.className = `pill ${kind}`;
  }

  async function refresh() {
    if (state.polling) return;
    if (!state.gateway) {
      renderHealth("idle", "no gateway set");
      return;
    }
    state.polling = true;
    const gateway = state.gateway;
    try {
      const [nodes, registry, models, health, spans, credits] = await Promise.allSettled([
        getJson("/api/nodes"), getJson("/api/registry"), getJson("/v1/models"), getJson("/healthz"), getJson("/api/spans"),
        getJson("/api/credits"), loadHistory(),
      ]);
      window.dllmVerify?.recordAnswer(gateway, health.status === "fulfilled");  // ranks gateways found later
      if (gateway !== state.gateway) return;  // the URL changed meanwhile
      if (nodes.status === "fulfilled") renderNodes(nodes.value);
      renderExplorer(nodes.status === "fulfilled" ? nodes.value : null);
      // A gateway from before spans has no /api/spans: nothing to show, nothing wrong.
      renderSpans(spans.status === "fulfilled" ? spans.value : null);
      // Nor has one from before credits /api/credits: the line just stays hidden.
      renderGatewayCredits(credits.status === "fulfilled" ? credits.value : null);
      if (registry.status === "fulfilled") renderRegistry(registry.value);
      if (models.status === "fulfilled") renderModels(models.value);
      const failed = [nodes, registry, models, health].find((r) => r.status === "rejected");
      if (failed) {
        const err = failed.reason;
        ui.nodesError.textContent = err instanceof ApiError ? err.display : String(err);
        ui.nodesError.hidden = false;
      } else {
        ui.nodesError.hidden = true;
      }
      if (health.status === "fulfilled") {
        const live = isNum(health.value?.live_nodes) ? health.value.live_nodes : null;
        renderHealth(live ? "good" : "warn", live === null ? "gateway ok" : `${live} live node${live === 1 ? "" : "s"}`);
      } else {
        renderHealth("bad", "gateway unreachable");
      }
      ui.nodesUpdated.textContent = `Updated ${clock()}; refreshed every ${POLL_MS / 1000} s.`;
    } finally {
      state.polling = false;
    }
  }

  function restartPolling() {
    clearTimeout(state.pollTimer);
    const tick = async () => {
      if (!document.hidden) await refresh().catch(() => {});
      state.pollTimer = setTimeout(tick, POLL_MS);
    };
    tick();
  }

  // --- wiring ----------------------------------------------------------------------------

  ui.gatewayForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const url = normalizeHttpUrl(ui.gatewayUrl.value);
    if (ui.gatewayUrl.value.trim() && !url) {
      ui.gatewayHint.textContent = "That is not an http(s) URL.";
      ui.gatewayUrl.setAttribute("aria-invalid", "true");
      return;
    }
    setGateway(url);
  });
  ui.gatewayUrl.addEventListener("change", () => ui.gatewayForm.requestSubmit());

  ui.discoverForm.addEventListener("submit", (event) => {
    event.preventDefault();
    discover();
  });

  ui.promptForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.view === "chat") sendChat(); else generate();
  });
  ui.chatInput.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; not while an input method is composing.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    if (!state.running) ui.promptForm.requestSubmit(ui.chatSend);
  });
  ui.chatNew.addEventListener("click", newChat);
  ui.model.addEventListener("change", () => {
    state.viewChoice = null;  // a new model: its own view again
    applyView();
    renderModelHint();
  });
  for (const button of ui.viewButtons) {
    button.addEventListener("click", () => {
      state.viewChoice = button.dataset.view;
      applyView();
    });
  }
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      ui.promptForm.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", () => state.running && state.running.abort());
  ui.clearLog.addEventListener("click", () => {
    ui.log.replaceChildren();
    ui.logEmpty.hidden = false;
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh().catch(() => {});
  });

  // The explorer: a node is chosen on the map (click, Enter or Space) or in the nodes table.
  const chosen = (target) => target.closest("[data-testid=map-node], [data-testid=map-gateway], [data-testid=node-row]");
  ui.map.addEventListener("click", (event) => {
    const node = chosen(event.target);
    if (node) selectNode(node.dataset.peerId || null);
  });
  ui.map.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" && event.key !== " ") return;
    const node = chosen(event.target);
    if (!node) return;
    event.preventDefault();
    selectNode(node.dataset.peerId || null);
  });
  ui.nodes.addEventListener("click", (event) => {
    const row = chosen(event.target);
    if (!row || !row.dataset.peerId || (window.getSelection && String(window.getSelection()))) return;  // not when selecting text
    selectNode(row.dataset.peerId);
    const rect = ui.nodeDetail.getBoundingClientRect();  // the charts just below the table: bring them into view
    if (rect.top < 0 || rect.top > window.innerHeight - 80) {
      ui.nodeDetail.scrollIntoView({ block: "start", behavior: matchMedia("(prefers-reduced-motion: reduce)").matches ? "auto" : "smooth" });
    }
  });
  ui.nodeDetail.addEventListener("click", (event) => {
    if (event.target.closest("[data-testid=detail-close]")) selectNode(null);
  });
  if (window.ResizeObserver) {
    let frame = 0;
    new ResizeObserver(() => {
      cancelAnimationFrame(frame);
      frame = requestAnimationFrame(() => {
        if (Math.round(ui.map.getBoundingClientRect().width) !== explorer.width) renderMap();
      });
    }).observe(ui.map);
  }

  function start() {
    applyView();
    renderExplorer(null);
    const params = new URLSearchParams(location.search);
    ui.registryRef.value = params.get("registry") || storage.get(STORE.registry);
    ui.ipfsGateway.value = params.get("ipfs") || storage.get(STORE.ipfs);
    const fromQuery = params.get("gateway");
    // Served by a gateway: talk to it. From disk: the URL saved last time, if any.
    const initial = fromQuery || (fromDisk ? storage.get(STORE.gateway) : pageGateway());
    setGateway(initial, { save: Boolean(fromQuery) || fromDisk });
    if (!state.gateway) {
      ui.discover.open = Boolean(ui.registryRef.value) || fromDisk;
      if (ui.registryRef.value) discover();
    }
  }

  // Exposed for tests and the console; the page itself does not depend on it.
  window.dllm = { liveGateways, registryUrl, carFile, normalizeHttpUrl, parseEvent, sseEvents, refresh, copyText, state };
  start();
})();
