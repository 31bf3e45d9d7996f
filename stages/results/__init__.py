"""What the pipeline hands to people: caption metrics (metrics) and the Hub upload (hub)."""
