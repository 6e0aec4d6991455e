"""Side-by-side benchmarks against peers, run on loopback (`make bench-…`)."""
