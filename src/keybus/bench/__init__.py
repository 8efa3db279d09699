"""The comparison harness: scenarios measured honestly (real timestamps, end-to-end
latency percentiles, order violations, duplicates and losses counted separately)."""
