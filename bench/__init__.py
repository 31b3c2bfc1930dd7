"""chatsync's benchmark (spec/benchmarks.md): `python -m bench [--quick]`."""
