"""flowtrace benchmarks: ``python -m benchmarks.run`` (``make bench``). Scripts, not tests."""
