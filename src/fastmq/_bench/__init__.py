"""Internals of ``fastmq bench`` and of the pytest-benchmark suite in ``benchmarks/``.

One module per concern, so the CLI benchmark and the micro benchmarks share code:

* ``payloads``   -- message builders and the per-message verifier (``Tally``)
* ``peers``      -- one adapter class per queue implementation (fastmq and its peers)
* ``runner``     -- runs one scenario cell in real processes (barrier start, bounded waits)
* ``reference``  -- limits measured on the spot (memcpy bandwidth, bare Python call cost)
* ``report``     -- the table, JSON and the optional matplotlib chart
* ``progress``   -- the one-line live progress display on stderr
"""
