"""chatsync's benchmark (docs/benchmarks.md): `python -m bench [--quick]`."""
