// Node 20 lacks Promise.withResolvers (Node 22+), which libp2p 3 / Helia 7 call at run time.
// Imported first by common.mjs, so it runs before any of their modules are evaluated.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
