"""The registry: signed hash-chained blocks, their storage, and their publication on IPFS."""
