"""What every stage uses: its params block loaded and validated (params), atomic outputs and JSONL (files), the one
retry policy (retry), and a console without library noise (console)."""
