"""Persistence shared by the library, the lab and the benchmarks: the one home of writing results to disk.

* `postquant.store.files`: files and directories written whole (never half written), file hashes, and
  fingerprints of JSON-able configurations. Standard library only: the CLI imports it before torch.
* `postquant.store.claims`: a lock shared by processes (`filelock`) and claims, "this process works on key
  K", taken over from processes that died.
* `postquant.store.table`: `ResultTable`, rows of results keyed by a string in one JSON file that several
  processes extend at once and that an interrupted run resumes (rows already there are skipped).

Import the module you need; this package imports nothing, so that the CLI pays only for `files`.
"""
