"""What every stage uses: its params block loaded and validated (params), atomic outputs and JSONL (files)."""
