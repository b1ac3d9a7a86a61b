"""guardd's benchmark suite, run by `make bench`; see bench/README.md."""
