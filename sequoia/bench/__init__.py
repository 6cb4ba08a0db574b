"""Benchmarks: the decoding methods compared (:mod:`~sequoia.bench.methods`), the run over
prompts and sampling settings (:mod:`~sequoia.bench.runner`) and its report on disk
(:mod:`~sequoia.bench.report`)."""
