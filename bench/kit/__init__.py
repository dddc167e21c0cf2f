"""What the benchmarks and the tests both build runs from (issue #18: each thing has one home).

* `configs` — the one config factory: tiny-run raw configs, a DadConfig from one, a TOML file of one.
* `images` — every synthetic image: photo-like patterns, colour ramps, bad corpus files' ingredients.
* `teach`, `train` — a slow plugin teacher, cache reads, cached tiny runs, seeded students, streams.
* `faults` — the fault-injection machinery: forked stage runs, output digests, kill trials, bad
  corpora and configs, moto S3.

The tests import these; nothing here imports tests/. Plugin teachers are named by dotted path
(`bench.kit.teach:SlowPixelTeacher`), so whatever runs them needs the repository root importable:
`python -m …` from the root, Ray workers (they get the driver's working directory) and forkserver
children (they get its sys.path) have it; tests/conftest.py exports it in PYTHONPATH for the rest.
"""
